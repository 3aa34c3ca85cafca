"""kl-f4 of diffusers' blocks (exportable) against imgvae 0.1's own blocks, at equal steps on the
5-minute recipe of bench/quality.py (train.epochs=1000, so the same KL warm-up), each run then
scored as quality.py scores it (EMA weights, 128 held-out crops). Prints one JSON line per run.

The two differ only in three details, each of which can be switched back on main's blocks:
`perlevel` (0.1's GroupNorm groups, 4 channels each, eps 1e-5, where AutoencoderKL takes one
count), `sympad` (0.1's symmetric stride-2 padding, where AutoencoderKL pads right and bottom).
With both, main's blocks compute exactly 0.1's function (to 4e-6). `mapinit` starts main's blocks
from the very weights 0.1 draws for the seed (needs 0.1's tree), so runs pair up by seed.

    git worktree add /tmp/base 7e4bb0e          # imgvae 0.1's kl-f4
    python bench/kl_equal_steps.py main 200 1 /tmp/kp/main-s1
    python bench/kl_equal_steps.py 0.1 200 1 /tmp/kp/base-s1 --tree /tmp/base
    python bench/kl_equal_steps.py mapinit+perlevel+sympad 200 1 /tmp/kp/x --tree /tmp/base
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

# bench/quality.py's overrides for its 5-minute runs, written out: importing quality.py would import
# main's imgvae, where the `0.1` variant must run on 0.1's tree alone.
RECIPE = ["data.train=[embedded:train]", "data.eval=[embedded:eval]", "data.image_size=64", "train.epochs=1000",
          "eval.after_training=false", "train.log_every=20", "train.ckpt_every=0", "prior.after_training=false",
          "data.crop=random", "data.views_per_image=1024", "data.eval_views_per_image=64"]


def patch_blocks(akl, variant: set[str]) -> None:
    """Switch 0.1's details back on in main's kl_blocks."""
    blocks = akl.kl_blocks

    def patched(*args, **kwargs):
        encoder, decoder, widths, side = blocks(*args, **kwargs)
        for m in [*encoder.modules(), *decoder.modules()]:
            if "perlevel" in variant and isinstance(m, torch.nn.GroupNorm):
                m.num_groups, m.eps = min(32, m.num_channels // 4) or 1, 1e-5
            if "sympad" in variant and type(m).__name__ == "Downsample2D":
                m.padding, m.conv.padding = 1, (1, 1)
        return encoder, decoder, widths, side

    akl.kl_blocks = patched


def old_weights(state: dict) -> dict:
    """0.1's kl-f4 state dict -> main's (diffusers' block names; the fused qkv split)."""
    names = {"encoder.0": "encoder.conv_in", "encoder.2": "encoder.down_blocks.0.downsamplers.0.conv",
             "encoder.4": "encoder.down_blocks.1.downsamplers.0.conv", "encoder.9": "encoder.conv_norm_out",
             "encoder.11": "encoder.conv_out", "decoder.0": "decoder.conv_in",
             "decoder.6": "decoder.up_blocks.0.upsamplers.0.conv", "decoder.9": "decoder.up_blocks.1.upsamplers.0.conv",
             "decoder.11": "decoder.conv_norm_out", "decoder.13": "decoder.conv_out"}
    for old, new in [("encoder.1", "encoder.down_blocks.0.resnets.0"), ("encoder.3", "encoder.down_blocks.1.resnets.0"),
                     ("encoder.5", "encoder.down_blocks.2.resnets.0"), ("encoder.6", "encoder.mid_block.resnets.0"),
                     ("encoder.8", "encoder.mid_block.resnets.1"), ("decoder.1", "decoder.mid_block.resnets.0"),
                     ("decoder.3", "decoder.mid_block.resnets.1"), ("decoder.4", "decoder.up_blocks.0.resnets.0"),
                     ("decoder.7", "decoder.up_blocks.1.resnets.0"), ("decoder.10", "decoder.up_blocks.2.resnets.0")]:
        names |= {f"{old}.body.0": f"{new}.norm1", f"{old}.body.2": f"{new}.conv1", f"{old}.body.3": f"{new}.norm2",
                  f"{old}.body.5": f"{new}.conv2", f"{old}.skip": f"{new}.conv_shortcut"}
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if key == "log_scale" or prefix in names:
            out[key if key == "log_scale" else f"{names[prefix]}.{leaf}"] = value
            continue
        side, _, part = prefix.split(".")  # the attention of the mid block
        attention = f"{side}.mid_block.attentions.0"
        flat = value.flatten(1) if leaf == "weight" and value.dim() > 1 else value
        if part == "norm":
            out[f"{attention}.group_norm.{leaf}"] = value
        elif part == "qkv":
            out |= {f"{attention}.{n}.{leaf}": c for n, c in zip(("to_q", "to_k", "to_v"), flat.chunk(3, 0))}
        else:
            out[f"{attention}.to_out.0.{leaf}"] = flat
    return out


def init_from_old(akl, base, tree: Path) -> None:
    """Main's kl-f4 starts from 0.1's initial weights for the seed; the RNG then goes on from where
    0.1's construction leaves it, so the data and noise draws are 0.1's too."""
    registry = dict(base.MODELS)  # importing 0.1's module registers its models: keep main's
    spec = importlib.util.spec_from_file_location("imgvae_0_1_conv", tree / "src/imgvae/models/conv.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    base.MODELS.clear()
    base.MODELS.update(registry)
    ours = akl.KLAutoencoder

    class FromOld(ours):
        def __init__(self, cfg, image_size, scale, downsamplings):
            before = torch.get_rng_state()
            theirs = old.KLAutoencoder(cfg, image_size, scale, downsamplings)
            after = torch.get_rng_state()
            torch.set_rng_state(before)
            super().__init__(cfg, image_size, scale, downsamplings)
            self.load_state_dict(old_weights(theirs.state_dict()))
            torch.set_rng_state(after)

    akl.KLAutoencoder = FromOld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", help="main, 0.1, or main's blocks with +-joined switches: mapinit, perlevel, sympad")
    parser.add_argument("steps", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tree", type=Path, help="imgvae 0.1's tree (for 0.1 and mapinit)")
    parser.add_argument("--preset", default="kl-f4")
    args = parser.parse_args()
    variant = set(args.variant.split("+"))
    if "0.1" in variant:
        sys.path.insert(0, str(args.tree / "src"))
    from imgvae.commands.verbs import evaluate_checkpoint
    from imgvae.config import load_config
    from imgvae.train.engine import train
    from imgvae.train.task import Callback

    if "0.1" not in variant:
        import imgvae.models.autoencoder_kl as akl
        import imgvae.models.base as base

        patch_blocks(akl, variant)
        if "mapinit" in variant:
            init_from_old(akl, base, args.tree)

    class StopAt(Callback):
        def on_checkpoint(self, name):
            if name == f"step_{args.steps:08d}":
                raise KeyboardInterrupt

    cfg = load_config(args.preset, [*RECIPE, f"train.seed={args.seed}", f"train.ckpt_every_steps={args.steps}"])
    try:
        train(cfg, args.out, progress=False, callbacks=[StopAt()])
    except KeyboardInterrupt:
        pass
    settings = {"seed": args.seed, "iw_samples": 1, "batch_size": 64, "sample_reference": ["embedded:train"],
                "generation_images": 0}
    metrics, _ = evaluate_checkpoint(args.out / "checkpoints" / f"step_{args.steps:08d}", out=args.out / "m.json",
                                     overrides={"eval": settings}, progress=False)
    print(json.dumps({"variant": args.variant, "seed": args.seed, "steps": args.steps,
                      "psnr": metrics["reconstruction"]["psnr"]["mean"],
                      "fd_recon": metrics["distribution"]["fd_effnet_recon"]}), flush=True)


if __name__ == "__main__":
    main()
