"""Caching the VAE posterior ahead gives the same training losses as encoding every step."""
import jax
import numpy as np
import pytest
from PIL import Image

from sdjax import parallel
from sdjax.training.data import write_captioned_folder
from sdjax.training.loop import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    items = []
    for i, (caption, colour) in enumerate([("the red dog", (220, 30, 30)), ("the blue cat", (30, 30, 220))]):
        a = np.zeros((40, 36, 3), np.uint8)
        a[:] = colour
        a[8:30, 5 + 4 * i:20 + 4 * i] = 255
        items.append((Image.fromarray(a), caption))
    return write_captioned_folder(tmp_path_factory.mktemp("data") / "set", items)


def test_cached_latents_match_encoding_each_step(tiny_pipeline_dir, tiny_data, tmp_path):
    losses = {}
    for cache in (False, True):
        cfg = TrainConfig(model=str(tiny_pipeline_dir), train_data=str(tiny_data), output_dir=str(tmp_path / str(cache)),
                          resolution=32, batch_size=1, max_steps=3, learning_rate=1e-4, cache_latents=cache)
        trainer = Trainer.create(cfg, mesh=parallel.data_mesh(jax.devices()[:2]))
        try:
            losses[cache] = []
            for _ in range(3):
                trainer.state, metrics = trainer.step_fn(trainer.state, trainer.frozen, trainer.next_batch())
                losses[cache].append(float(metrics["loss"]))
            assert (trainer.latent_cache is not None) == cache
        finally:
            trainer.close()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert len(set(losses[False])) == 3  # really different batches / draws per step


def test_cache_needs_fixed_images():
    with pytest.raises(ValueError, match="cache_latents needs fixed images"):
        TrainConfig(train_data="x", cache_latents=True, random_flip=True).validate()
