"""What drivers ask the evaluator pool for: a profile at a fidelity, with a stable key for resume."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from core.profile import NM, Profile


@dataclass(frozen=True)
class Candidate:
    """One fitness request: per-unit sparsities (and N:M patterns) scored on ``tokens`` tokens of
    the fitness windows — the first ones, the ones after the first ``skip`` (a fidelity rung adding
    tokens to the ones scored before), or the ``draw``-th random slice of that size (fresh tokens).

    ``driver`` and ``params`` are recorded with the result; the ``key`` — what makes two requests
    the same evaluation — is the profile, the fidelity, the draw and the metric only.
    """

    sparsities: tuple[float, ...]
    nm: tuple[NM | None, ...] | None = None
    tokens: int | None = None
    metric: str = "kl"
    driver: str = ""
    params: dict = field(default_factory=dict, compare=False, hash=False)
    draw: int = 0
    skip: int = 0
    granularity: str = "block"

    @classmethod
    def of(cls, profile: Profile, tokens: int | None = None, driver: str = "", metric: str = "kl", draw: int = 0,
           **params) -> "Candidate":
        return cls(profile.sparsities, profile.nm, tokens, metric, driver, params, draw,
                   granularity=profile.granularity)

    @property
    def profile(self) -> Profile:
        return Profile(self.sparsities, self.nm, self.granularity)

    @property
    def key(self) -> str:
        nm = None if self.nm is None else [None if p is None else list(p) for p in self.nm]
        fields = [[round(s, 9) for s in self.sparsities], nm, self.tokens, self.metric]
        if self.granularity != "block":  # block keys stay as they were, so older results tables still answer
            fields = [self.granularity] + fields
        if self.skip:
            return json.dumps(fields + [self.draw, self.skip])
        return json.dumps(fields + [self.draw] if self.draw else fields)



@dataclass
class DriverResult:
    """What each driver returns: its best profile, that profile's fitness and what it cost."""

    driver: str
    best: Profile
    fitness: float
    evaluations: int
    details: dict = field(default_factory=dict)
