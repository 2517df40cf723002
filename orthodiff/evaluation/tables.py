"""Markdown tables of an evaluation's metrics.json content."""

from __future__ import annotations


def cell(entry: dict | None, digits: int = 3) -> str:
    """"0.812 [0.754, 0.866]", or "n/a (reason)" for an undefined metric."""
    if entry is None:
        return "n/a"
    if entry.get("value") is None:
        return f"n/a ({entry.get('reason', 'undefined')})"
    text = f"{entry['value']:.{digits}f}"
    if entry.get("ci_low") is not None:
        text += f" [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def classification_tables(metrics: dict, labels: list[str], thresholds: dict) -> str:
    overall = metrics["overall"]
    rows = []
    for label in labels:
        m = overall["labels"][label]
        rows.append([label, f"{m['n_patients']} ({m['n_pos']}/{m['n_neg']})", cell(m["auroc"]), cell(m["ap"]),
                     f"{m['threshold']:.3f}", cell(m["sensitivity"]), cell(m["specificity"]), cell(m["ece"])])
    macro = overall["macro"]
    rows.append(["**macro**", str(overall["n_patients"]), cell(macro["auroc"]), cell(macro["ap"]), "", "", "",
                 cell(macro["ece"])])
    parts = [_table(["label", "patients (pos/neg)", "AUROC", "AP", "threshold", "sensitivity", "specificity", "ECE"],
                    rows)]
    excluded = macro["auroc"]["labels_excluded"]
    if excluded:
        listed = ", ".join(f"{name} ({reason})" for name, reason in excluded.items())
        parts.append(f"Left out of the macro AUROC and AP: {listed}.")
    defaults = {name: t["reason"] for name, t in thresholds.items() if t["source"] == "default"}
    if defaults:
        parts.append("Thresholds not chosen on validation: "
                     + "; ".join(f"{name}: {reason}" for name, reason in defaults.items()) + ".")
    for key, title in (("by_site", "By site"), ("by_field_strength", "By field strength")):
        header = [title.split()[-1], "patients", "macro AUROC", "macro AP"] + [f"{label} AUROC" for label in labels]
        group_rows = [[name, str(g["n_patients"]), cell(g["macro"]["auroc"]), cell(g["macro"]["ap"])]
                      + [cell(g["labels"][label]["auroc"]) for label in labels]
                      for name, g in metrics[key].items()]
        parts.append(f"### {title}\n\n" + _table(header, group_rows))
    parts.append("Subgroup macros average the labels defined in that subgroup; n/a cells are left out of them "
                 "(metrics.json lists them under labels_excluded).")
    return "\n\n".join(parts)


def segmentation_tables(metrics: dict, structures: list[str]) -> str:
    overall = metrics["overall"]
    rows = [[name, str(e["n_series"]), cell(e["dice"]), cell(e["hd95_mm"], 2), str(e["n_absent"]), str(e["n_missed"])]
            for name, e in overall["structures"].items()]
    rows.append(["**mean**", str(overall["n_series"]), cell(overall["mean"]["dice"]),
                 cell(overall["mean"]["hd95_mm"], 2), "", ""])
    if overall.get("thin_structures"):
        rows.append(["**thin-structure mean**", "", cell(overall["thin_mean"]["dice"]),
                     cell(overall["thin_mean"]["hd95_mm"], 2), "", ""])
    parts = [_table(["structure", "series", "Dice", "HD95 (mm)", "absent in target", "not predicted"], rows)]
    for key, title in (("by_site", "By site"), ("by_field_strength", "By field strength"), ("by_plane", "By plane")):
        header = [title.split()[-1], "patients", "mean Dice", "mean HD95 (mm)"] + [f"{s} Dice" for s in structures]
        group_rows = [[name, str(g["n_patients"]), cell(g["mean"]["dice"]), cell(g["mean"]["hd95_mm"], 2)]
                      + [cell(g["structures"][s]["dice"]) for s in structures]
                      for name, g in metrics.get(key, {}).items()]
        parts.append(f"### {title}\n\n" + _table(header, group_rows))
    return "\n\n".join(parts)
