"""What the pass decided at every SDPA site: records, a table that fits 120 columns, and a JSON-ready dict.

Example:
    >>> report = Report([SiteRecord("layers.0.attn", 0, "moba", 64, 2, "default policy", form="is_causal",
    ...                             impl="reference")])
    >>> print(report)
    moba-compile report: 1 of 1 attention sites on MoBA
    policy: <default>
    graph  layer  module         decision  chunk  topk  form       impl       reason
    -----  -----  -------------  --------  -----  ----  ---------  ---------  ------
    0      0      layers.0.attn  moba      64     2     is_causal  reference  default policy
    >>> report.to_dict()["sites"][0]["decision"]
    'moba'
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .policy import MODES, ROUTINGS, Mode, Routing

__all__ = [
    "FORMS",
    "FORM_CAUSAL",
    "FORM_DECODE",
    "FORM_MASK",
    "FLASH_RAN",
    "FORM_NONE",
    "FORM_PACKED",
    "MASKED_RAN",
    "Form",
    "SiteRecord",
    "Report",
    "TABLE_WIDTH",
]

#: How an attention call was recognised, the same values from the compile pass and the Hugging Face attention function:
Form = Literal["is_causal", "mask", "kv-cache", "packed", "-"]
#: causal self-attention without a mask, ``Lq == Lk`` (SDPA's ``is_causal=True``; a causal transformers module handed
#: no mask, which its SDPA call runs as ``is_causal``).
FORM_CAUSAL: Form = "is_causal"
#: a boolean mask with ``Lq == Lk``, checked for causality at run time (once per forward for a shared mask).
FORM_MASK: Form = "mask"
#: queries ending this layer's cached keys, ``Lq < Lk`` (a decode step or chunked prefill), with or without a mask.
FORM_DECODE: Form = "kv-cache"
#: packed documents: ``cu_seqlens`` (``cu_seq_lens_q`` of transformers), or a boolean mask found at run time to be the
#: block-diagonal causal mask of packed documents; every document runs as MoBA on its own.
FORM_PACKED: Form = "packed"
#: a call MoBA does not serve (the record's reason says why); it runs dense.
FORM_NONE: Form = "-"
FORMS: tuple[Form, ...] = (FORM_CAUSAL, FORM_MASK, FORM_DECODE, FORM_PACKED, FORM_NONE)

#: What :meth:`Report.with_mask_observations` adds to a dense site run by ``moba::dense_attention``, by the branch that
#: ran (the mask check's observation).
FLASH_RAN = "ran: flash (mask exactly causal)"
MASKED_RAN = "ran: the masked SDPA call (mask not exactly causal)"

#: The width ``str(report)`` keeps its lines within (a module path longer than about 50 characters can exceed it).
TABLE_WIDTH = 120

_HEADER = ("graph", "layer", "module", "decision", "chunk", "topk", "routing", "form", "impl", "reason")
# The routing column's index in _HEADER: shown only when a MoBA site routes by group (see Report.format).
_ROUTING_COLUMN = _HEADER.index("routing")
# Marks an effectively dense MoBA site in the decision column; the legend under the table says what it means.
_EFFECTIVELY_DENSE_MARK = "*"


@dataclass(frozen=True)
class SiteRecord:
    """One SDPA call site and what became of it.

    Attributes:
        module: dotted module path (``model.layers.7.self_attn``); "" when the graph has no module paths.
        layer: layer index used by the policy (from the module path, else the order of SDPA calls), or None.
        decision: ``"moba"`` or ``"dense"``.
        chunk_size, topk: the MoBA parameters of a converted site; None for dense sites.
        reason: why, in words (policy rule, default, or what made the call unconvertible).
        form: how the call was recognised, one of :data:`FORMS`: ``"is_causal"`` (causal, no mask, ``Lq == Lk``),
            ``"mask"`` (boolean mask, ``Lq == Lk``), ``"kv-cache"`` (queries ending this layer's cached keys: decode or
            chunked prefill), ``"packed"`` (packed documents: ``cu_seqlens``, or a mask found at run time to be their
            block-diagonal causal mask), or ``"-"`` (not a call MoBA serves). Both paths (compile pass, Hugging Face
            attention function) use these values with these meanings.
        impl: ``"triton"`` or ``"reference"`` for converted sites, with the reason when the Triton kernels cannot run;
            always ``"-"`` for a dense site (set so on construction: a dense site runs SDPA, not a MoBA kernel).
        graph: index of the compiled graph (graph breaks give several) the site belongs to.
        mask_tag: identifier of the shared run-time mask check, when the site has one: a MoBA site with a mask, or a
            dense site run by ``moba::dense_attention`` (the policy's ``dense_sdpa = "flash_when_causal"``), which
            takes flash where that check finds the mask exactly causal.
        effectively_dense: a MoBA site whose top-k covers every chunk of its key length
            (``topk * chunk_size >= key length``, known when the length is static): it computes exactly dense causal
            attention, so MoBA saves nothing there. Always False for a dense site. The table marks it ``moba*``.
        routing: the gate's routing of a converted site, ``"head"`` (one choice per query head, the default) or
            ``"group"`` (one per key head, shared by its query heads; spec section 6); None for a dense site (set so on
            construction).

    Raises:
        ValueError: ``decision`` is not ``"moba"`` or ``"dense"``, ``form`` is not one of :data:`FORMS`, or
            ``routing`` is not one of :data:`~moba_compile.policy.ROUTINGS` (or None).

    Example:
        >>> SiteRecord("layers.3.attn", 3, "dense", None, None, "dense_last=1", impl="reference").impl
        '-'
    """

    module: str
    layer: int | None
    decision: Mode
    chunk_size: int | None
    topk: int | None
    reason: str
    form: Form = FORM_NONE
    impl: str = "-"
    graph: int = 0
    mask_tag: str | None = None
    effectively_dense: bool = False
    routing: Routing | None = "head"

    def __post_init__(self) -> None:
        if self.decision not in MODES:
            raise ValueError(f"SiteRecord.decision = {self.decision!r} is not valid; allowed: 'moba', 'dense'")
        if self.form not in FORMS:
            raise ValueError(f"SiteRecord.form = {self.form!r} is not valid; allowed: {', '.join(map(repr, FORMS))}")
        if self.routing is not None and self.routing not in ROUTINGS:
            allowed = ", ".join(map(repr, ROUTINGS))
            raise ValueError(f"SiteRecord.routing = {self.routing!r} is not valid; allowed: {allowed} or None")
        if self.decision == "dense":
            # A site that ended dense (by policy, or by a run-time mask check after a MoBA plan) runs SDPA: a kernel
            # name, a routing or an effectively-dense flag carried over from the plan would misreport it.
            object.__setattr__(self, "impl", "-")
            object.__setattr__(self, "effectively_dense", False)
            object.__setattr__(self, "routing", None)


@dataclass
class Report:
    """Every decision of one compilation (all its graphs), plus the policy rules that matched no site.

    ``str(report)`` is a table within :data:`TABLE_WIDTH` columns (see :meth:`format`); :meth:`to_dict` is the same
    content for machines. ``report.sites`` are :class:`SiteRecord`; ``report.unmatched_rules`` are rule descriptions.

    Attributes:
        sites: one record per SDPA call, in graph order.
        unmatched_rules: descriptions (``Policy.describe_rule``) of the policy rules that matched no site.
        policy_source: where the policy came from (file path, ``"<dict>"``, ``"<Policy>"`` or ``"<default>"``).

    Example:
        >>> Report().to_dict()
        {'policy_source': '<default>', 'num_sites': 0, 'num_moba': 0, 'num_effectively_dense': 0, 'sites': [], 'unmatched_rules': []}
    """  # noqa: E501

    sites: list[SiteRecord] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)
    policy_source: str = "<default>"

    @property
    def moba_sites(self) -> list[SiteRecord]:
        """The sites converted to MoBA (``decision == "moba"``), effectively dense ones included."""
        return [s for s in self.sites if s.decision == "moba"]

    @property
    def dense_sites(self) -> list[SiteRecord]:
        """The sites left on dense SDPA (``decision == "dense"``)."""
        return [s for s in self.sites if s.decision == "dense"]

    @property
    def effectively_dense_sites(self) -> list[SiteRecord]:
        """The MoBA sites whose top-k covers every chunk (``effectively_dense``): dense attention computed as MoBA."""
        return [s for s in self.sites if s.effectively_dense]

    def with_mask_observations(
        self,
        observed: dict[str, int],
        dense_reasons: dict[int, str],
        packed: dict[int, str] | None = None,
        flash_kinds: Collection[int] = (),
    ) -> Report:
        """A copy in which sites whose shared mask was found unfit for MoBA at run time are reported dense, those
        whose mask was found to describe packed documents are reported with the form ``"packed"``, and dense sites
        with a mask check (``dense_sdpa = "flash_when_causal"``) say which SDPA ran.

        Args:
            observed: mask-check tags (``SiteRecord.mask_tag``) mapped to the mask kind seen at run time.
            dense_reasons: the mask kinds that run dense SDPA, mapped to why.
            packed: the mask kinds that run MoBA per packed document, mapped to the note added to the reason.
            flash_kinds: the mask kinds under which a dense site with a mask check runs flash attention (the exactly
                causal kind); under any other its masked SDPA call ran.

        Returns:
            A new report; the matching MoBA sites become dense with that reason (and no chunk size, top-k or impl), or
            take the form ``"packed"`` with the note after their reason; a dense site with a mask check gets
            ``"ran: flash (mask exactly causal)"`` or ``"ran: the masked SDPA call (mask not exactly causal)"``.

        Raises:
            Nothing.

        Example:
            >>> site = SiteRecord("a", 0, "moba", 8, 2, "default policy", impl="reference", mask_tag="g0:m:0")
            >>> Report([site]).with_mask_observations({"g0:m:0": 2}, {2: "mask not causal"}).sites[0].impl
            '-'
        """
        sites = []
        for s in self.sites:
            kind = observed.get(s.mask_tag) if s.mask_tag is not None else None
            if s.decision == "moba" and kind in dense_reasons:
                s = replace(s, decision="dense", chunk_size=None, topk=None, reason=dense_reasons[kind])
            elif s.decision == "moba" and packed and kind in packed:
                s = replace(s, form=FORM_PACKED, reason=f"{s.reason}; {packed[kind]}")
            elif s.decision == "dense" and kind is not None:
                ran = FLASH_RAN if kind in flash_kinds else MASKED_RAN
                s = replace(s, reason=f"{s.reason}; {ran}")
            sites.append(s)
        return Report(sites=sites, unmatched_rules=list(self.unmatched_rules), policy_source=self.policy_source)

    def merge(self, other: Report) -> Report:
        """The sites of both, and the rules that matched no site in either.

        Args:
            other: the report of a later graph of the same compilation.

        Returns:
            A new report with ``self.sites + other.sites``; a rule is unmatched only if it matched nothing in both
            (a report without sites says nothing about rules); ``policy_source`` is ``other``'s.

        Raises:
            Nothing.

        Example:
            >>> site = SiteRecord("layers.0.attn", 0, "moba", 8, 2, "default policy")
            >>> Report([site], ["rule 0 (layers=[9])"]).merge(Report()).unmatched_rules
            ['rule 0 (layers=[9])']
        """
        if not self.sites:
            unmatched = list(other.unmatched_rules)
        elif not other.sites:
            unmatched = list(self.unmatched_rules)
        else:
            unmatched = [r for r in self.unmatched_rules if r in other.unmatched_rules]
        return Report(sites=self.sites + other.sites, unmatched_rules=unmatched, policy_source=other.policy_source)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data that ``json.dumps`` accepts (``moba-compile explain --json`` prints it).

        Returns:
            ``{"policy_source", "num_sites", "num_moba", "num_effectively_dense", "sites", "unmatched_rules"}``;
            each entry of ``sites`` holds every :class:`SiteRecord` field by name (``None`` for unknown values), in
            the order of ``report.sites``.

        Raises:
            Nothing.

        Example:
            >>> import json
            >>> site = SiteRecord("layers.0.attn", 0, "dense", None, None, "rule 0 (layers=[0])")
            >>> json.dumps(Report([site]).to_dict()["sites"][0]["reason"])
            '"rule 0 (layers=[0])"'
        """
        return {
            "policy_source": self.policy_source,
            "num_sites": len(self.sites),
            "num_moba": len(self.moba_sites),
            "num_effectively_dense": len(self.effectively_dense_sites),
            "sites": [asdict(s) for s in self.sites],
            "unmatched_rules": list(self.unmatched_rules),
        }

    def format(self, width: int = TABLE_WIDTH) -> str:
        """The report as a table whose lines stay within ``width`` columns.

        A reason that would push its row past ``width`` is replaced by a note number (``[1]``) and written in full,
        wrapped, under the table; sites with the same reason share one note. Only a module path or impl note too long
        to fit even then can make a row wider. An effectively dense MoBA site reads ``moba*`` in the decision column,
        explained by a line under the table. The ``routing`` column (``head`` or ``group`` for a MoBA site, ``-`` for
        a dense one) is shown when some MoBA site routes by group; without it every MoBA site routes per head (the
        default), and the table keeps the width it had before routing existed.

        Args:
            width: the line width to keep within (``str(report)`` uses :data:`TABLE_WIDTH`, 120).

        Returns:
            The counts, the policy's source, the table, then any notes, the ``moba*`` legend and the rules that matched
            no site, joined by newlines.

        Raises:
            Nothing.

        Example:
            >>> site = SiteRecord("layers.1.attn", 1, "moba", 64, 2, "default policy; " + "x " * 60, impl="reference")
            >>> print(Report([site]).format(width=80))  # doctest: +NORMALIZE_WHITESPACE
            moba-compile report: 1 of 1 attention sites on MoBA
            policy: <default>
            graph  layer  module         decision  chunk  topk  form  impl       reason
            -----  -----  -------------  --------  -----  ----  ----  ---------  ------
            0      1      layers.1.attn  moba      64     2     -     reference  [1]
            notes:
            [1] default policy; x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x
                x x x x x x x x x x x x x x x x x x x x x x x x x x x x
            >>> grouped = SiteRecord("layers.1.attn", 1, "moba", 64, 2, "rule 0", impl="reference", routing="group")
            >>> print(Report([grouped]).format())  # doctest: +NORMALIZE_WHITESPACE
            moba-compile report: 1 of 1 attention sites on MoBA
            policy: <default>
            graph  layer  module         decision  chunk  topk  routing  form  impl       reason
            -----  -----  -------------  --------  -----  ----  -------  ----  ---------  ------
            0      1      layers.1.attn  moba      64     2     group    -     reference  rule 0
        """
        cells = [
            (
                str(s.graph),
                "-" if s.layer is None else str(s.layer),
                s.module or "-",
                s.decision + (_EFFECTIVELY_DENSE_MARK if s.effectively_dense else ""),
                "-" if s.chunk_size is None else str(s.chunk_size),
                "-" if s.topk is None else str(s.topk),
                "-" if s.routing is None else s.routing,
                s.form,
                s.impl,
            )
            for s in self.sites
        ]
        header = _HEADER
        if not any(s.routing == "group" for s in self.sites):
            header = header[:_ROUTING_COLUMN] + header[_ROUTING_COLUMN + 1 :]
            cells = [c[:_ROUTING_COLUMN] + c[_ROUTING_COLUMN + 1 :] for c in cells]
        widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        notes: dict[str, int] = {}  # reason -> note number, in order of first use
        rows = []
        for row, site in zip(cells, self.sites):
            line = fmt.format(*row, site.reason)
            if len(line) > width:
                number = notes.setdefault(site.reason, len(notes) + 1)
                line = fmt.format(*row, f"[{number}]")
            rows.append(line.rstrip())
        # The counts come first, on a line of their own: a long policy path on the same line would push them away.
        summary = f"moba-compile report: {len(self.moba_sites)} of {len(self.sites)} attention sites on MoBA"
        if self.effectively_dense_sites:
            summary += f" ({len(self.effectively_dense_sites)} effectively dense)"
        lines = [
            summary,
            f"policy: {self.policy_source}",
            fmt.format(*header),
            fmt.format(*("-" * w for w in widths), "-" * len(header[-1])),
            *rows,
        ]
        if not rows:
            lines.append("(no scaled_dot_product_attention call found)")
        if notes:
            lines.append("notes:")
            for reason, number in notes.items():
                lines += _wrap(reason, width, f"[{number}] ")
        if self.effectively_dense_sites:
            legend = (
                f"moba{_EFFECTIVELY_DENSE_MARK}: effectively dense: topk * chunk_size covers every chunk of the key "
                "length, so MoBA computes exactly dense causal attention there (a smaller chunk_size or topk, or a "
                "longer sequence, makes it sparse)"
            )
            lines += _wrap(legend, width, "")
        if self.unmatched_rules:
            lines += _wrap("rules that matched no site: " + "; ".join(self.unmatched_rules), width, "")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _wrap(text: str, width: int, first: str) -> list[str]:
    # Regexes and module paths have no spaces: never split inside a word (a long one overflows rather than breaks).
    return textwrap.wrap(
        text,
        width,
        initial_indent=first,
        subsequent_indent=" " * len(first),
        break_long_words=False,
        break_on_hyphens=False,
    ) or [first.rstrip()]
