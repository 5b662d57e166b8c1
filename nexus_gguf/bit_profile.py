"""Bit profiles: how many bits more or fewer each layer's K and V get than the preset says.

Layers do not matter alike. SmolLM2-135M, 4096 prose tokens, `high`: one bit coarser in one
section at a time moved the KLD by +0.0033 for layer 7's V and +0.0024 for layer 3's, and by
nothing measurable for most K sections (README). With the KLD about the sum of what each
section's error adds, and each section's share falling as 2^(-2 bits), the bits that keep the
sum where uniform bits put it and store least are the preset's plus 0.5 log2(s / mean(s)) for a
section of sensitivity s (reverse water-filling): a third of a bit fewer a value on that model at
the same KLD.

A profile is measured once per model (calibrate.py: `nexus-gguf calibrate MODEL TEXT`) and kept
by the model file's fingerprint; save_state finds it (NEXUS_GGUF_BIT_PROFILE: a file, or `none`;
then the user's directory, NEXUS_GGUF_PROFILE_DIR or ~/.cache/nexus-gguf/profiles; then the
profiles shipped in nexus_gguf/data/profiles). The encoder turns a section's extra bits into a
finer or coarser step in the section's stored scale (stages/lattice.py), so a file needs no
profile to be read, and every reader that decodes format 2 decodes it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import ConfigError
from .storage import write_atomic

PROFILE_VERSION = 1
MAX_OFFSET = 1.0  # bits: at most twice or half a section's step (measurements past it are noise)
OFFSET_STEPS = 8  # offsets in 1/8 bits: what the lattice's log scales can store exactly
# sensitivities below half the mean are measured as noise (the KLD of 256 tokens moves by ~5%
# between equal files): lifted to it, so that no section is starved on a measurement of zero
FLOOR_OF_MEAN = 0.5
PACKAGED = Path(__file__).parent / "data" / "profiles"


@dataclass(frozen=True)
class BitProfile:
    fingerprint: str  # the model file's (gguf_file.GgufHeader.fingerprint)
    model: str  # its name, for messages
    k_bits: tuple[float, ...]  # bits added to each model layer's K (negative: fewer)
    v_bits: tuple[float, ...]
    source: dict = field(default_factory=dict)  # how it was measured (calibrate.py)

    def __post_init__(self):
        for name in ("k_bits", "v_bits"):
            values = getattr(self, name)
            if not all(isinstance(b, (int, float)) and math.isfinite(b) and abs(b) <= MAX_OFFSET for b in values):
                raise ConfigError(f"bit profile: {name} must be numbers within +-{MAX_OFFSET}")
        if len(self.k_bits) != len(self.v_bits) or not self.k_bits:
            raise ConfigError("bit profile: k_bits and v_bits need one entry per layer, as many of each")

    @property
    def name(self) -> str:
        return self.fingerprint[:12]

    def extra_bits(self, kind: str, layer: Optional[int]) -> float:
        """Bits added to the section of `kind` ("k" or "v") of model layer `layer`."""
        bits = self.k_bits if kind == "k" else self.v_bits if kind == "v" else ()
        return float(bits[layer]) if layer is not None and 0 <= layer < len(bits) else 0.0

    def fits(self, facts) -> bool:
        return self.fingerprint == facts.fingerprint and len(self.k_bits) == facts.n_layer

    def require_fits(self, facts, where: str) -> "BitProfile":
        """This profile, or a ConfigError naming `where` it came from if another model's."""
        if not self.fits(facts):
            raise ConfigError(f"{where} was measured on another model ({self.model}, fingerprint {self.name}), "
                              f"not {facts.name or facts.file_name} (fingerprint {facts.fingerprint[:12]})")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "fingerprint": self.fingerprint, "model": self.model,
                "k_bits": list(self.k_bits), "v_bits": list(self.v_bits), "source": self.source}

    @classmethod
    def from_json(cls, data: Any, where: str = "bit profile") -> "BitProfile":
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION:
            raise ConfigError(f"{where}: not a version {PROFILE_VERSION} bit profile")
        try:
            return cls(str(data["fingerprint"]), str(data.get("model", "")), tuple(data["k_bits"]),
                       tuple(data["v_bits"]), dict(data.get("source") or {}))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None


def offsets(sensitivity: Sequence[float]) -> list[float]:
    """Bits to add to each section, from the KLD each one alone added one bit coarser: sections
    at 0.5 log2(s / mean s) (s: the measured share, negative ones as 0, lifted to FLOOR_OF_MEAN
    of the mean) within +-MAX_OFFSET, in 1/OFFSET_STEPS bits. Predicted KLD: the uniform one."""
    s = [max(float(x), 0.0) for x in sensitivity]
    if not s or not all(math.isfinite(x) for x in s) or sum(s) <= 0:
        return [0.0] * len(s)
    floor = FLOOR_OF_MEAN * sum(s) / len(s)
    s = [x + floor for x in s]
    mean = sum(s) / len(s)
    return [round(OFFSET_STEPS * min(max(0.5 * math.log2(x / mean), -MAX_OFFSET), MAX_OFFSET)) / OFFSET_STEPS for x in s]


def user_dir() -> Path:
    return Path(os.environ.get("NEXUS_GGUF_PROFILE_DIR") or Path.home() / ".cache" / "nexus-gguf" / "profiles")


def read(path) -> BitProfile:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read bit profile {path}: {e}") from None
    return BitProfile.from_json(data, str(path))


def write(profile: BitProfile, path) -> str:
    """Write `profile` as JSON at `path` (atomically); its path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, [json.dumps(profile.to_json(), indent=1).encode() + b"\n"])
    return path


def disabled() -> bool:
    """NEXUS_GGUF_BIT_PROFILE=none: every layer at the preset's bits."""
    return os.environ.get("NEXUS_GGUF_BIT_PROFILE", "").strip().lower() == "none"


def find(facts) -> Optional[BitProfile]:
    """The profile save_state uses for the model of `facts`, or None (uniform bits)."""
    if disabled():
        return None
    chosen = os.environ.get("NEXUS_GGUF_BIT_PROFILE", "").strip()
    if chosen:
        return read(chosen).require_fits(facts, f"NEXUS_GGUF_BIT_PROFILE={chosen}")
    for directory in (user_dir(), PACKAGED):
        path = Path(directory) / f"{facts.fingerprint}.json"
        if path.is_file():
            profile = read(path)
            if profile.fits(facts):
                return profile
    return None
