"""The guarded matcher: when the best entry may answer a query. One similarity threshold is not
enough for precision (all-MiniLM-L6-v2 at cosine 0.95 is right about 91% of the time on STS-B), so a
hit also needs a margin over the best entry with another answer and agreeing decisive tokens."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.retrieval.guards import TextFacts, disagreement

HIT = "hit"


@dataclass(frozen=True, slots=True)
class Matcher:
    min_similarity: float
    min_margin: float = 0.0
    decisive_tokens: bool = True

    def judge(self, similarity: float, margin: float, query: TextFacts, entry: TextFacts) -> str:
        """`hit`, or why not: low_similarity, low_margin, or the decisive token kind that disagrees."""
        if similarity < self.min_similarity:
            return "low_similarity"
        if margin < self.min_margin:
            return "low_margin"
        if self.decisive_tokens and disagreement(query, entry) is not None:
            return "token_mismatch"
        return HIT
