"""The results table of one run: every injected number beside its baseline, printed and logged."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def results_rows(metrics: dict) -> tuple[list[str], list[list]]:
    """Rows (metric, baseline/teacher, student, injected student[, oracle]) for the table and W&B. The oracle
    column (the teacher's own attention injected alike, ``evaluate.oracle``) is there when the run scored it."""
    ev = metrics.get("evaluate") or {}
    oracle = "oracle" in ev
    header = ["metric", "reference", "student", "injected", *(["oracle"] if oracle else [])]

    def row(name: str, reference, values: dict) -> list:
        """One table row: ``values`` holds the student's, injected student's and oracle's numbers."""
        return [name, reference, values.get("student"), values.get("injected"), *([values.get("oracle")] if oracle else [])]

    rows: list[list] = []
    kl = metrics.get("controller", {}).get("heldout_kl", {})
    if kl:
        rows.append(row("held-out KL: controller", None, {"injected": kl.get("controller")}))
        for name in ("uniform", "recency", "student_self"):
            rows.append(row(f"held-out KL: {name} baseline", kl.get(name), {}))
    if ev:
        bpb = ev.get("bits_per_byte")  # none for inject.source=emphasis (texts mark no span)
        if bpb:
            rows.append(row("bits per byte (ref = teacher)", bpb["teacher"], bpb))
        for name, domain in list(ev.get("domains", {}).items())[1:]:  # the first is the run's own data, above
            d = domain["bits_per_byte"]
            rows.append(row(f"bits per byte, {name} ({domain['num_texts']} texts)", d["teacher"], d))
        qa = ev.get("facts_qa")
        if qa:
            rows.append(row(f"facts QA accuracy, {qa['num_prompts']} prompts (ref = teacher)", qa["teacher"], qa))
        for name, dq in ev.get("qa_domains", {}).items():
            rows.append(row(f"{name} QA accuracy, {dq['num_prompts']} items (ref = teacher)", dq["teacher"], dq))
            for buckets in dq.get("by_tag", {}).values():  # the values name their tag: "8 facts", "start"
                rows.extend(row(f"  {name}: {value} ({b['n']} items)", b["teacher"], b) for value, b in buckets.items())
        positions = ev.get("position_buckets")
        if positions:
            rows.extend(row(f"bits per byte, tokens {label} ({positions['num_texts']} long texts)",
                            b["bits_per_byte"]["teacher"], b["bits_per_byte"])
                        for label, b in positions["buckets"].items())
        if "next_token_kl" in ev:
            rows.append(row("next-token KL to teacher", None, ev["next_token_kl"]))
        for layer, gaps in ev.get("habit_distance", {}).items():
            for name in ("norm_entropy", "locality", "attn_kl"):
                rows.append(row(f"habit distance {layer} {name}", 0.0,
                                {side: values[name] for side, values in gaps.items()}))
    return header, rows


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> ``{"a/b/c": float}`` for loggers."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def verdict(metrics: dict) -> list[str]:
    """Plain-language reading of the table; says so when injection hurts or learns nothing."""
    lines = []
    kl = metrics.get("controller", {}).get("heldout_kl", {})
    if kl.get("controller") is not None and kl.get("student_self") is not None:
        beats = kl["controller"] < kl["student_self"]
        lines.append(
            f"controller {'beats' if beats else 'does NOT beat'} the student's own attention as a predictor of the "
            f"teacher's (KL {kl['controller']:.4f} vs {kl['student_self']:.4f})"
        )
    ev = metrics.get("evaluate")
    if ev:
        bpb = ev.get("bits_per_byte")  # none for inject.source=emphasis (texts mark no span)
        what = f"injection ({ev.get('source', 'controller')})"
        if bpb:
            lines.append(f"{what}: bits per byte {_paired(bpb.get('injected_minus_student'), 'texts')} "
                         f"(student {bpb['student']:.4f} -> {bpb['injected']:.4f}; teacher {bpb['teacher']:.4f})")
            lines.extend(_oracle_lines("bits per byte", bpb, "texts", 4))
            if bpb["teacher"] >= bpb["student"]:
                lines.append("the teacher is not ahead of the student on this text: no gap for injection to close")
        for name, domain in list(ev.get("domains", {}).items())[1:]:
            d = domain["bits_per_byte"]
            lines.append(f"{what} on {name}: bits per byte {_paired(d.get('injected_minus_student'), 'texts')} "
                         f"(student {d['student']:.4f} -> {d['injected']:.4f}; teacher {d['teacher']:.4f})")
            lines.extend(_oracle_lines(f"bits per byte on {name}", d, "texts", 4))
        qa = ev.get("facts_qa")
        if qa and qa["student"] is not None and qa.get("injected") is not None:
            lines.append(f"{what}: facts QA accuracy {_paired(qa.get('injected_minus_student'), 'prompts', 3)} "
                         f"(student {qa['student']:.3f} -> {qa['injected']:.3f}; teacher {qa['teacher']:.3f}, "
                         f"chance 0.25, {qa['num_prompts']} prompts)")
            lines.extend(_oracle_lines("facts QA accuracy", qa, "prompts", 3))
        elif qa and qa.get("injected_note"):
            lines.append(f"facts QA with injection not measured: {qa['injected_note']}")
        lines.extend(position_lines(ev.get("position_buckets"), what))
        for name, dq in ev.get("qa_domains", {}).items():
            if "teacher_minus_student" in dq:
                lines.append(f"{name} QA, teacher - student (the gap injection could close): "
                             f"{_paired(dq['teacher_minus_student'], 'items', 3)}")
            if dq.get("injected") is None:
                lines.append(f"{name} QA with injection not measured: {dq.get('injected_note')}")
                continue
            lines.append(f"{what}: {name} QA accuracy {_paired(dq.get('injected_minus_student'), 'items', 3)} "
                         f"(student {dq['student']:.3f} -> {dq['injected']:.3f}; teacher {dq['teacher']:.3f}, "
                         f"chance 0.25, {dq['num_prompts']} items)")
            lines.extend(_oracle_lines(f"{name} QA accuracy", dq, "items", 3))
            if "teacher" in dq.get("evidence_mass", {}):
                lines.append(evidence_line(name, dq["evidence_mass"]))
    return lines


def evidence_line(name: str, mass: dict) -> str:
    """Where each model's answer query looks on ``name``'s items: the best head's evidence share against uniform."""
    looks = ", ".join(f"{role} {m['top']['share']:.2f} (L{m['top']['layer']} H{m['top']['head']})"
                      for role, m in mass.items())
    teacher = mass["teacher"]
    return (f"{name}: share of the answer query's passage attention on the span holding the answer, best head: "
            f"{looks}; uniform {teacher['uniform']:.2f}, {teacher['n']} items")


def position_lines(positions: dict | None, what: str) -> list[str]:
    """Per position bucket: injected − student with its interval, and teacher − student."""
    if not positions:
        return []
    lines = []
    for label, b in positions["buckets"].items():
        past = ", past the student's trained context" if b["beyond_student_context"] else ""
        gap = b["teacher_minus_student"]
        gap = "—" if gap is None else f"{gap:+.4f}"
        difference = b.get("injected_minus_student")
        paired = (_paired(difference, "long texts") if not difference or "low" in difference
                  else f"{difference['estimate']:+.4f} ({difference['verdict']})")
        lines.append(f"{what}, tokens {label}{past}: bits per byte {paired}; teacher - student {gap}")
    if positions.get("injected_note"):
        lines.append(f"position buckets with injection not measured: {positions['injected_note']}")
    return lines


def _oracle_lines(what: str, section: dict, items: str, digits: int) -> list[str]:
    """The oracle's reading of one measure (``section`` has ``oracle`` when ``evaluate.oracle`` scored it): the
    oracle against the student, and the injected student against the oracle (how far it is from its ceiling)."""
    if section.get("oracle") is None:
        return []
    return [f"oracle (the teacher's attention, injected alike): {what} "
            f"{_paired(section.get('oracle_minus_student'), items, digits)} (student {section['student']:.{digits}f} "
            f"-> {section['oracle']:.{digits}f})",
            f"injected - oracle: {what} {_paired(section.get('injected_minus_oracle'), items, digits)}"]


def _paired(difference: dict | None, items: str, digits: int = 4) -> str:
    """``+0.0117 [+0.0051, +0.0183] over 24 texts: worse`` — a paired difference, read by its interval."""
    if not difference:
        return "(no paired interval)"
    verdict = {"worse": "WORSE", "better": "better", "no difference": "no difference"}[difference["verdict"]]
    p = f", McNemar p={difference['p_value']:.3f}" if "p_value" in difference else ""
    return (f"{difference['estimate']:+.{digits}f} [{difference['low']:+.{digits}f}, {difference['high']:+.{digits}f}] "
            f"({difference['level']:.0%} paired interval over {difference['n']} {items}{p}): {verdict}")


def numbers_table(title: str, header: list[str], rows: list[list]) -> Table:
    """A rich table whose first column names the row and the others hold numbers (None shown as —)."""
    table = Table(title=title)
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(row[0], *(_fmt(v) for v in row[1:]))
    return table


def print_results(metrics: dict, cfg) -> None:
    header, rows = results_rows(metrics)
    console = Console()
    console.print(numbers_table(
        f"uzr results: {cfg.teacher.name} -> {cfg.student.name}, layers {list(cfg.inject.layers)}, "
        f"alpha {cfg.alpha.value} ({cfg.alpha.schedule}, {cfg.inject.mode})", header, rows,
    ))
    for line in verdict(metrics):
        console.print(f"• {line}")
