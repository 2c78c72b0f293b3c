"""The guarded matcher: when the best entry may answer a query. One similarity threshold is not
enough for precision (all-MiniLM-L6-v2 at cosine 0.95 is right about 91% of the time on STS-B), so a
hit also needs a margin over the best entry with another answer, agreeing decisive tokens and, when a
policy names one, the learned verifier's probability."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.retrieval.guards import TextFacts, disagreement
from proxy.retrieval.verifier import Verifier

HIT = "hit"


@dataclass(frozen=True, slots=True)
class Matcher:
    min_similarity: float
    min_margin: float = 0.0
    decisive_tokens: bool = True
    verifier: Verifier | None = None

    def judge(self, similarity: float, margin: float, query: TextFacts, entry: TextFacts) -> str:
        """`hit`, or why not: low_similarity, low_margin, token_mismatch, verifier_rejected."""
        if similarity < self.min_similarity:
            return "low_similarity"
        if margin < self.min_margin:
            return "low_margin"
        if self.decisive_tokens and disagreement(query, entry) is not None:
            return "token_mismatch"
        if self.verifier is not None and not self.verifier.accepts(similarity, margin, query, entry):
            return "verifier_rejected"
        return HIT
