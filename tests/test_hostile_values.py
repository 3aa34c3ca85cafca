"""Every config value checked before any work: hypothesis draws a hostile value (NaN, infinities,
0, negatives, huge numbers, wrong types, empty lists, unicode and space paths) for any key of
any section, and of every architecture's model section; `imgvae train` either accepts it and
trains its steps on a tiny set, or refuses it with one line naming the key (or the path it
names), exit code 2, no traceback and nothing written."""

import contextlib
import dataclasses
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgvae.commands.cli import main
from imgvae.config import MODEL_CONFIGS, PRIOR_CONFIGS, Config

from conftest import write_jpegs

NAN, INF = float("nan"), float("inf")
HOSTILE = [NAN, INF, -INF, 0, -1, 10**12, 1e30, "x", [], ["é dir/ü space"], True, None, "café au lait ü"]
SMALL_MODELS = {  # each architecture at 16 px, small
    "seed": ["model.latent_dim=4"], "resnet": ["model.latent_dim=4", "model.base_channels=4", "model.levels=2"],
    "kl-f4": ["model.base_channels=4"], "kl-f8": ["model.base_channels=4"],
    "autoencoder-kl": ["model.block_out_channels=[8,16]", "model.norm_num_groups=4"],
    "vq-f4": ["model.base_channels=4", "model.codebook_size=16"],
    "vq-f8": ["model.base_channels=4", "model.codebook_size=16"],
}
BASE = ["data.image_size=16", "data.crop_size=64", "data.num_workers=0", "data.eval=[]", "train.batch_size=4",
        "train.epochs=1", "train.device=cpu", "train.precision=fp32", "eval.after_training=false",
        "eval.grid_size=2", "train.log_every=1"]
SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name not in ("model", "prior")]
# (section, key, the model it is tried on, the prior kind whose section it is)
KEYS = [(section, f.name, "seed", "gmm") for section in SECTIONS
        for f in dataclasses.fields(type(getattr(Config(), section)))]
KEYS += [("model", f.name, name, "gmm") for name, cls in MODEL_CONFIGS.items() for f in dataclasses.fields(cls)]
KEYS += [("prior", f.name, "seed" if kind != "tokens" else "vq-f4", kind) for kind, cls in PRIOR_CONFIGS.items()
         for f in dataclasses.fields(cls)]
PHOTOS = Path(tempfile.mkdtemp(prefix="imgvae-hostile-values-")) / "photos"
write_jpegs(PHOTOS, 8, seed=7)


def as_yaml(value) -> str:
    """The value as KEY=VALUE writes it (YAML)."""
    if isinstance(value, float) and value != value:
        return ".nan"
    if isinstance(value, float) and abs(value) == INF:
        return ".inf" if value > 0 else "-.inf"
    return json.dumps(value, ensure_ascii=False)  # JSON is YAML


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(KEYS), st.sampled_from(HOSTILE))
def test_a_hostile_value_for_any_key_is_refused_in_one_line_or_trains(key, value):
    section, name, model, kind = key
    out = Path(tempfile.mkdtemp(prefix="imgvae-hostile-run-")) / "run"
    item = f"{section}.{name}={as_yaml(value)}"
    args = ["train", "-o", str(out), "--no-progress", *BASE, f"data.train=[{PHOTOS}]", f"model.name={model}",
            *SMALL_MODELS[model], f"prior.kind={kind}", item]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    said = err.getvalue()
    if code == 0:
        assert json.loads((out / "summary.json").read_text())["steps"] >= 1, item
        return
    assert code == 2, (item, code, said)
    assert said.startswith("imgvae: error: ") and said.count("\n") == 1 and "Traceback" not in said, (item, said)
    # The key, or for a source or file key the path it names (the value as YAML read it).
    texts = [name, str(value), as_yaml(value).strip('"')]
    texts += [str(value[0])] if isinstance(value, list) and value else []
    assert any(t in said for t in texts), (item, said)
    assert not out.exists(), (item, sorted(p.name for p in out.iterdir()))
