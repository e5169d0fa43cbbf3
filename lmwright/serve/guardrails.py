"""Rule-based guardrails around a model: checks on what goes in and on what comes out.

One ``Guardrails`` object is built from a ``GuardrailsConfig`` and used by the HTTP server, the chat
CLI, the web UI and the Python API alike, so a rule behaves the same everywhere. Every firing is
counted (``counters``, exported on ``/metrics``) and logged. These are deterministic rules, not a
safety model: they catch what the operator lists, nothing more.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmwright.config import ConfigError, opt

log = logging.getLogger("lmwright.guardrails")

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# international or national numbers with optional separators: +33 6 12 34 56 78, (555) 123-4567, 13812345678
PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d(?:[\s.-]?\d){6,13}(?!\w)")


@dataclass
class InputRules:
    max_chars: int = opt(0, "refuse prompts longer than this many characters; 0 = no limit")
    block_patterns: list[str] = opt([], "regular expressions that make a prompt be refused (case-insensitive)")
    block_keywords: list[str] = opt([], "words or phrases that make a prompt be refused (case-insensitive)")
    refusal: str = opt("I can't help with that request.", "the reply given instead of calling the model")
    redact_pii: bool = opt(False, "replace e-mail addresses and phone numbers with [EMAIL] / [PHONE]")
    template: str = opt("", "wrap each user message, e.g. 'Answer briefly.\\n{prompt}'; must contain {prompt}")


@dataclass
class OutputRules:
    stop: list[str] = opt([], "stop strings added to every request")
    block_patterns: list[str] = opt([], "regular expressions not allowed in replies (case-insensitive)")
    block_keywords: list[str] = opt([], "words or phrases not allowed in replies (case-insensitive)")
    block_action: str = opt("mask", "what a blocked reply gets: mask (replace the match) or refuse (whole reply)")
    mask: str = opt("[REDACTED]", "replacement text for masked matches")
    refusal: str = opt("I can't share that.", "the reply used when block_action is refuse")
    max_chars: int = opt(0, "cut replies to this many characters; 0 = no limit")
    json_schema: dict | None = opt(None, "a JSON schema every reply must satisfy (or a path to one)")
    json_retries: int = opt(2, "regenerations allowed when a reply is not valid against json_schema")


@dataclass
class GuardrailsConfig:
    input: InputRules = opt(InputRules(), "rules applied to prompts")
    output: OutputRules = opt(OutputRules(), "rules applied to replies")

    def check(self) -> None:
        if self.output.block_action not in ("mask", "refuse"):
            raise ConfigError(f"output.block_action must be mask or refuse, got {self.output.block_action!r}")
        if self.input.template and "{prompt}" not in self.input.template:
            raise ConfigError("input.template must contain {prompt}")
        for where, pats in (("input", self.input.block_patterns), ("output", self.output.block_patterns)):
            for p in pats:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ConfigError(f"{where}.block_patterns: {p!r} is not a valid regex: {e}") from None


def load_guardrails(path: str | Path | None) -> Guardrails:
    """A ``Guardrails`` from a YAML file (``None`` -> no rules)."""
    if not path:
        return Guardrails(GuardrailsConfig())
    from lmwright.config import load_config

    return Guardrails(load_config(GuardrailsConfig, [path]))


@dataclass
class InputVerdict:
    text: str
    refused: bool = False
    reason: str = ""


@dataclass
class OutputVerdict:
    text: str
    refused: bool = False
    valid: bool = True  # False: failed json_schema (the caller may regenerate)
    reason: str = ""


def _compile(patterns: list[str], keywords: list[str]) -> re.Pattern | None:
    parts = list(patterns) + [re.escape(k) for k in keywords if k]
    return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE) if parts else None


class Guardrails:
    """Applies a ``GuardrailsConfig``; thread-safe counters of every rule that fired."""

    def __init__(self, cfg: GuardrailsConfig | None = None):
        self.cfg = cfg or GuardrailsConfig()
        self.cfg.check()
        self._in_block = _compile(self.cfg.input.block_patterns, self.cfg.input.block_keywords)
        self._out_block = _compile(self.cfg.output.block_patterns, self.cfg.output.block_keywords)
        schema = self.cfg.output.json_schema
        if isinstance(schema, str):
            schema = json.loads(Path(schema).read_text(encoding="utf-8"))
        self.schema: dict | None = schema
        self.counters: dict[str, int] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------------- bookkeeping
    def _fire(self, rule: str, detail: str = "") -> None:
        with self._lock:
            self.counters[rule] = self.counters.get(rule, 0) + 1
        log.info("guardrail %s fired%s", rule, f": {detail}" if detail else "")

    @property
    def active_output(self) -> bool:
        o = self.cfg.output
        return bool(self._out_block or o.max_chars or self.schema)

    @property
    def buffers_output(self) -> bool:
        """Rules that need the whole reply before anything may be shown (refuse, JSON schema)."""
        o = self.cfg.output
        return bool(self.schema or (self._out_block and o.block_action == "refuse"))

    # -------------------------------------------------------------------- input
    def check_input(self, text: str, wrap: bool = True) -> InputVerdict:
        """Refuse, redact and wrap one user message (``wrap=False`` for history already wrapped)."""
        i = self.cfg.input
        if i.max_chars and len(text) > i.max_chars:
            self._fire("input_max_chars", f"{len(text)} > {i.max_chars}")
            return InputVerdict(text, True, "input_max_chars")
        if self._in_block is not None and (m := self._in_block.search(text)):
            self._fire("input_block", m.group(0))
            return InputVerdict(text, True, "input_block")
        if i.redact_pii:
            text, n1 = EMAIL_RE.subn("[EMAIL]", text)
            text, n2 = PHONE_RE.subn("[PHONE]", text)
            if n1:
                self._fire("input_pii_email", str(n1))
            if n2:
                self._fire("input_pii_phone", str(n2))
        if i.template and wrap:
            text = i.template.replace("{prompt}", text)
            self._fire("input_template")
        return InputVerdict(text)

    def check_messages(self, messages: list[dict]) -> tuple[list[dict], InputVerdict]:
        """Apply input rules to the user turns of a conversation (the last one gets the template)."""
        out = [dict(m) for m in messages]
        last_user = max((k for k, m in enumerate(out) if m.get("role") == "user"), default=None)
        for k, m in enumerate(out):
            if m.get("role") != "user":
                continue
            # wrap only the new turn: earlier turns were wrapped when they were new
            v = self.check_input(str(m.get("content", "")), wrap=k == last_user)
            if v.refused:
                return out, v
            m["content"] = v.text
        return out, InputVerdict("")

    @property
    def refusal(self) -> str:
        return self.cfg.input.refusal

    def stop_strings(self, stop: list[str] | None) -> list[str]:
        return list(stop or []) + [s for s in self.cfg.output.stop if s not in (stop or [])]

    # -------------------------------------------------------------------- output
    def check_output(self, text: str) -> OutputVerdict:
        o = self.cfg.output
        if self._out_block is not None and self._out_block.search(text):
            if o.block_action == "refuse":
                self._fire("output_block_refuse")
                return OutputVerdict(o.refusal, refused=True, reason="output_block")
            text, k = self._out_block.subn(o.mask, text)
            self._fire("output_block_mask", str(k))
        if o.max_chars and len(text) > o.max_chars:
            self._fire("output_max_chars")
            text = text[:o.max_chars]
        if self.schema is not None:
            err = validate_json(text, self.schema)
            if err:
                self._fire("output_json_invalid", err)
                return OutputVerdict(text, valid=False, reason=err)
        return OutputVerdict(text)

    def generate_checked(self, produce: Callable[[], str]) -> OutputVerdict:
        """Run ``produce`` (one generation) and check it; regenerate while the JSON schema fails."""
        v = self.check_output(produce())
        tries = 0
        while not v.valid and tries < self.cfg.output.json_retries:
            tries += 1
            self._fire("output_json_retry")
            v = self.check_output(produce())
        return v

    def stream_filter(self) -> StreamGuard:
        return StreamGuard(self)


class StreamGuard:
    """Output rules on a stream: masking and the length cap work incrementally with a small hold-back
    (the longest keyword), rules that need the whole reply buffer it and release it at the end."""

    def __init__(self, g: Guardrails):
        self.g = g
        self.buf = ""
        self.sent = 0  # characters of the (masked) text already released
        self.refused = False
        kws = g.cfg.output.block_keywords
        self.hold = max([len(k) for k in kws] + [64 if g.cfg.output.block_patterns else 0])

    def push(self, delta: str) -> str:
        if not self.g.active_output:
            return delta
        self.buf += delta
        if self.g.buffers_output:
            return ""
        cut = max(0, len(self.buf) - self.hold)
        if self.g._out_block is not None:  # never release half of a match
            for m in self.g._out_block.finditer(self.buf):
                if m.start() < cut < m.end():
                    cut = m.start()
        return self._release(self.buf[:cut])

    def _release(self, text: str) -> str:
        o = self.g.cfg.output
        if self.g._out_block is not None:
            masked = self.g._out_block.sub(o.mask, text)
        else:
            masked = text
        if o.max_chars:
            masked = masked[:o.max_chars]
        out = masked[self.sent:]
        self.sent = max(self.sent, len(masked))
        return out

    def finish(self) -> str:
        """The rest of the reply, with every rule applied to the whole text (counted once)."""
        if not self.g.active_output:
            return ""
        v = self.g.check_output(self.buf)
        self.refused = v.refused
        if v.refused or self.g.buffers_output:
            out = v.text[self.sent:] if not v.refused else v.text
            self.sent = len(v.text)
            return out
        return v.text[self.sent:]


# ------------------------------------------------------------------------------ JSON schema
def validate_json(text: str, schema: dict) -> str:
    """'' if ``text`` is JSON valid against ``schema``, else the first problem found.

    Uses ``jsonschema`` when installed; otherwise a minimal validator covering type, properties,
    required, items, enum, additionalProperties=false, min/max length and minimum/maximum.
    """
    try:
        data = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    try:
        import jsonschema
    except ImportError:
        return _validate(data, schema, "$")
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as e:
        return e.message
    return ""


_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
                          "integer": int, "number": (int, float)}


def _validate(data: Any, schema: dict, path: str) -> str:
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        ok = any(isinstance(data, _TYPES[x]) and not (x in ("integer", "number") and isinstance(data, bool))
                 for x in types if x in _TYPES)
        if not ok:
            return f"{path}: expected {t}, got {type(data).__name__}"
    if "enum" in schema and data not in schema["enum"]:
        return f"{path}: {data!r} is not one of {schema['enum']}"
    if isinstance(data, dict):
        for k in schema.get("required", []):
            if k not in data:
                return f"{path}: missing required property '{k}'"
        props = schema.get("properties", {})
        for k, v in data.items():
            if k in props:
                if err := _validate(v, props[k], f"{path}.{k}"):
                    return err
            elif schema.get("additionalProperties") is False:
                return f"{path}: unexpected property '{k}'"
    if isinstance(data, list) and isinstance(schema.get("items"), dict):
        for k, v in enumerate(data):
            if err := _validate(v, schema["items"], f"{path}[{k}]"):
                return err
    if isinstance(data, str):
        if len(data) < schema.get("minLength", 0) or len(data) > schema.get("maxLength", len(data)):
            return f"{path}: string length {len(data)} out of bounds"
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        if "minimum" in schema and data < schema["minimum"]:
            return f"{path}: {data} < minimum {schema['minimum']}"
        if "maximum" in schema and data > schema["maximum"]:
            return f"{path}: {data} > maximum {schema['maximum']}"
    return ""
