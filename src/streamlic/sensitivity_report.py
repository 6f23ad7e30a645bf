"""The outputs of ``streamlic sensitivity``: sensitivity.json, the markdown tables and the bit-cost plot (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSON_FILE, MARKDOWN_FILE, PLOT_FILE = RESULT_FILES = ("sensitivity.json", "sensitivity.md", "sensitivity.png")
HARDWARE_GROUP = "hardware"  # the allocations as options of Hydra's hardware group: <out>/hardware/<name>.yaml


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _widths(layer: dict[str, int]) -> str:
    return f"w{layer['weight_bits']}a{layer['activation_bits']}"


def markdown(results: dict[str, Any]) -> str:
    """The per-layer table (changes in percent, the widths each allocation gives) and the configs table."""
    metrics, loss = results["float"], results["loss"]
    configs = results["allocations"] + results["uniform"]
    widths = [str(w) for w in results["widths"]]
    lines = [f"# Bit-width sensitivity of {results['checkpoint']} (stage {results['stage']})", "",
             f"Float RD loss {metrics['loss']:.4f} (bpp {metrics['bpp']:.4f}, PSNR {metrics['psnr']:.2f} dB) on "
             f"{results['images']} validation images ({results['data']}), lambda {loss['lmbda']} ({loss['distortion']}). "
             "Changes: fractional change of that loss in percent with only one layer's weights (W) or output "
             "activations (A) quantized at that width. MACs/px and weights as the hardware report counts them "
             "({}x{} image).".format(*results["uniform"][0]["image_size"]), "",
             "| layer | MACs/px | weights | " + " | ".join(f"W{w}" for w in widths) + " | "
             + " | ".join(f"A{w}" for w in widths) + " | " + " | ".join(c["name"] for c in results["allocations"]) + " |",
             "|---" * (3 + 2 * len(widths) + len(results["allocations"])) + "|"]
    for path, change in results["changes"].items():
        size = results["uniform"][0]["layers"][path]
        lines.append(f"| {path} | {size['macs_per_pixel']:.1f} | {size['weights']:,} | "
                     + " | ".join(_percent(change["weight"][w]) for w in widths) + " | "
                     + " | ".join(_percent(change["activation"][w]) for w in widths) + " | "
                     + " | ".join(_widths(c["layers"][path]) for c in results["allocations"]) + " |")
    if "resolution" in results:
        low = [f"{t:g} %" for t in results["tolerances_percent"] if t / 100 < results["resolution"]["change"]]
        resolution = results["resolution"]
        lines += ["", f"Resolution: {100 * resolution['change']:.2f} % (the largest change at {resolution['bits']} "
                  f"bits: {resolution['layer']}, {resolution['kind']}); "
                  + (f"the allocations of tolerance {', '.join(low)} choose on noise: measure on more validation "
                     "pixels (--crop, --data)." if low else "every tolerance lies above it.")]
    lines += ["", "Bit cost: Σ MACs/px × W × A_in (multiplier-area proxy); weight memory: Σ weights × W. "
              "RD-loss change at QAT entry: the whole config quantized, against the float loss.", "",
              "| config | L | bit cost | weight memory [kbit] | RD-loss change at QAT entry [%] | bpp | PSNR |",
              "|---|---|---|---|---|---|---|"]
    for config in configs:
        qat = config["qat_entry"]
        lines.append(f"| {config['name']} | {config['latent_bits']} | {config['bit_cost']:,.0f} | "
                     f"{config['weight_memory_bits'] / 1000:,.1f} | {_percent(qat['change'])} | {qat['bpp']:.4f} | "
                     f"{qat['psnr']:.2f} |")
    lines += ["", "Training an allocation from the checkpoint:", ""]
    lines += [f"- {config['name']}: `{config['override']}`" for config in results["allocations"]]
    if "sweep" in results:
        lines += ["", "Or every config, as options of the hardware group, with two seeds:", "",
                  f"`{results['sweep']}`"]
    return "\n".join(lines) + "\n"


def sweep_line(results: dict[str, Any], out_dir: Path) -> str:
    """The multirun that trains every allocation and the uniform configs from the checkpoint, two seeds each."""
    names = ",".join(dict.fromkeys(config["hardware"]["name"] for config in results["allocations"] + results["uniform"]))
    return (f"python train.py -m init_from={results['checkpoint']} hydra.searchpath=[file://{out_dir.resolve()}] "
            f"hardware={names} seed=0,1")


def plot(results: dict[str, Any], target) -> None:
    """Bit cost against the RD-loss change at QAT entry (a PNG into ``target``, a path or binary file): allocations
    as circles, uniform configs as squares."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in any process

    figure = Figure(figsize=(7, 5))
    axis = figure.subplots()
    for configs, marker, color, label in ((results["allocations"], "o", "C0", "per-layer allocation"),
                                          (results["uniform"], "s", "C3", "uniform widths")):
        points: dict[tuple[float, float], list[str]] = {}  # equal allocations share a point and one label
        for config in configs:
            points.setdefault((config["bit_cost"], 100 * config["qat_entry"]["change"]), []).append(config["name"])
        axis.scatter([x for x, _ in points], [y for _, y in points], marker=marker, color=color, label=label, zorder=3)
        for point, names in points.items():
            axis.annotate(", ".join(names), point, textcoords="offset points", xytext=(5, 4), fontsize="small")
    axis.set_xlabel("bit cost: Σ MACs/px × W × A_in")
    axis.set_ylabel("RD-loss change at QAT entry [%]")
    axis.set_title("Bit widths: cost against RD loss")
    axis.grid(True, alpha=0.4)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(target, format="png", dpi=120)


def write_results(results: dict[str, Any], out_dir: Path, force: bool) -> list[Path]:
    """sensitivity.json, sensitivity.md, sensitivity.png and each allocation's ``hardware/<name>.yaml`` (a config
    of Hydra's hardware group, found with ``hydra.searchpath``) in ``out_dir``, each written whole or not at all.
    Adds the multirun that trains them (``sweep``) to ``results``."""
    from omegaconf import OmegaConf

    from .codec.io import write_atomically

    group = out_dir / HARDWARE_GROUP
    group.mkdir(exist_ok=True)
    written = []
    for config in results["allocations"]:
        path = group / f"{config['hardware']['name']}.yaml"
        text = (f"# {config['name']}: made by streamlic sensitivity from {results['checkpoint']}\n"
                + OmegaConf.to_yaml(OmegaConf.create(config["hardware"])))
        write_atomically(path, lambda f, text=text: f.write(text.encode()), force)
        written.append(path)
    results["sweep"] = sweep_line(results, out_dir)
    text = markdown(results)
    written = [*(out_dir / name for name in RESULT_FILES), *written]
    write_atomically(written[0], lambda f: f.write(json.dumps(results, indent=2).encode()), force)
    write_atomically(written[1], lambda f: f.write(text.encode()), force)
    write_atomically(written[2], lambda f: plot(results, f), force)
    return written
