"""What the pass decided at every SDPA site, as records and as a readable table."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["SiteRecord", "Report"]


@dataclass(frozen=True)
class SiteRecord:
    """One SDPA call site and what became of it.

    Attributes:
        module: dotted module path (``model.layers.7.self_attn``); "" when the graph has no module paths.
        layer: layer index used by the policy (from the module path, else the order of SDPA calls), or None.
        decision: ``"moba"`` or ``"dense"``.
        chunk_size, topk: the MoBA parameters of a converted site; None for dense sites.
        reason: why, in words (policy rule, default, or what made the call unconvertible).
        form: how the call was recognised: ``"is_causal"``, ``"mask"``, ``"kv-cache"``, or ``"-"``.
        impl: ``"triton"`` or ``"reference"`` for converted sites, with the reason when the Triton kernels cannot run.
        graph: index of the compiled graph (graph breaks give several) the site belongs to.
        mask_tag: identifier of the shared run-time mask check, when the site has one.
    """

    module: str
    layer: int | None
    decision: str
    chunk_size: int | None
    topk: int | None
    reason: str
    form: str = "-"
    impl: str = "-"
    graph: int = 0
    mask_tag: str | None = None


@dataclass
class Report:
    """Every decision of one compilation (all its graphs), plus the policy rules that matched no site.

    ``str(report)`` is a table; ``report.sites`` are :class:`SiteRecord`; ``report.unmatched_rules`` are rule
    descriptions. ``report.moba_sites`` / ``report.dense_sites`` filter by decision.
    """

    sites: list[SiteRecord] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)
    policy_source: str = "<default>"

    @property
    def moba_sites(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision == "moba"]

    @property
    def dense_sites(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision == "dense"]

    def with_mask_observations(self, observed: dict[str, int], dense_reasons: dict[int, str]) -> Report:
        """A copy in which sites whose shared mask was found unfit for MoBA at run time are reported dense.

        ``observed`` maps mask-check tags to the kind seen; ``dense_reasons`` maps the kinds that run dense to why.
        """
        sites = []
        for s in self.sites:
            kind = observed.get(s.mask_tag) if s.mask_tag is not None else None
            if s.decision == "moba" and kind in dense_reasons:
                s = replace(s, decision="dense", chunk_size=None, topk=None, reason=dense_reasons[kind])
            sites.append(s)
        return Report(sites=sites, unmatched_rules=list(self.unmatched_rules), policy_source=self.policy_source)

    def __str__(self) -> str:
        header = ("graph", "layer", "module", "decision", "chunk", "topk", "form", "impl", "reason")
        rows = [
            (
                str(s.graph),
                "-" if s.layer is None else str(s.layer),
                s.module or "-",
                s.decision,
                "-" if s.chunk_size is None else str(s.chunk_size),
                "-" if s.topk is None else str(s.topk),
                s.form,
                s.impl,
                s.reason,
            )
            for s in self.sites
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        lines = [
            f"moba-compile report (policy: {self.policy_source}): {len(self.moba_sites)} of {len(self.sites)} "
            "attention sites on MoBA",
            fmt.format(*header),
            fmt.format(*("-" * w for w in widths[:-1]), "-" * len(header[-1])),
        ]
        lines += [fmt.format(*r) for r in rows]
        if not rows:
            lines.append("(no scaled_dot_product_attention call found)")
        if self.unmatched_rules:
            lines.append("rules that matched no site: " + "; ".join(self.unmatched_rules))
        return "\n".join(lines)

    def merge(self, other: Report) -> Report:
        """The sites of both, and the rules that matched no site in either."""
        if not self.sites:
            unmatched = list(other.unmatched_rules)
        elif not other.sites:
            unmatched = list(self.unmatched_rules)
        else:
            unmatched = [r for r in self.unmatched_rules if r in other.unmatched_rules]
        return Report(sites=self.sites + other.sites, unmatched_rules=unmatched, policy_source=other.policy_source)
