"""Caching the VAE posterior ahead gives the same training losses as encoding every step."""
import re

import jax
import numpy as np
import pytest
from flax import nnx
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


def test_cached_latents_match_encoding_each_step(micro_pipeline_dir, tiny_data, tmp_path):
    """Three real steps of a cached-latents run. Before each, the batch an encode-every-step run draws
    at that point has the cached posterior, and its loss at the cached run's weights and step key
    equals the step's loss. One train step is compiled (the encoding run's loss needs a forward
    pass only): the suite's cost, hence conftest's micro pipeline."""
    from sdjax.training import step as S
    trainers = {}
    try:
        for cache in (True, False):
            cfg = TrainConfig(model=str(micro_pipeline_dir), train_data=str(tiny_data),
                              output_dir=str(tmp_path / str(cache)), resolution=32, batch_size=1, max_steps=3,
                              learning_rate=1e-4, cache_latents=cache)
            trainers[cache] = Trainer.create(cfg, mesh=parallel.data_mesh(jax.devices()[:2]))
        cached, encoding = trainers[True], trainers[False]
        assert cached.latent_cache is not None and encoding.latent_cache is None
        assert cached.step_cfg == encoding.step_cfg
        encoded_loss = jax.jit(lambda params, frozen, batch, key: S.loss_fn(
            params, frozen, batch, key, graphdefs=encoding.graphdefs, cfg=encoding.step_cfg)[0])
        # The loss barely depends on the tiny VAE's small posterior std, so the cache is also compared directly.
        encode = jax.jit(lambda vae, x: nnx.merge(encoding.graphdefs.vae, vae).encode(x))  # loss_fn's posterior
        losses = {True: [], False: []}
        for _ in range(3):
            indices = encoding.data.indices_for_step(encoding.data.step)
            batch = jax.tree.map(lambda a: a[0], encoding.next_batch())  # accumulation 1
            posterior = encode(encoding.frozen.vae, batch["pixel_values"])
            np.testing.assert_allclose(cached.latent_cache[0][indices], posterior.mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(cached.latent_cache[1][indices], posterior.std, rtol=1e-5)
            losses[False].append(float(encoded_loss(cached.state.params, encoding.frozen, batch,
                                                    S.micro_batch_key(cached.state, 0))))
            cached_batch = cached.next_batch()
            assert "latent_mean" in cached_batch and "pixel_values" not in cached_batch
            cached.state, metrics = cached.step_fn(cached.state, cached.frozen, cached_batch)
            losses[True].append(float(metrics["loss"]))
    finally:
        for trainer in trainers.values():
            trainer.close()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert len(set(losses[False])) == 3  # really different batches / draws per step


def test_cache_needs_fixed_images():
    with pytest.raises(ValueError, match="cache_latents needs fixed images"):
        TrainConfig(train_data="x", cache_latents=True, random_flip=True).validate()


def test_each_epoch_trains_on_one_of_an_examples_captions(micro_pipeline_dir, tmp_path, capsys):
    """An image with several captions (a metadata.jsonl list) trains on the caption its epoch draws,
    with and without the latent cache; the tokens of every caption are looked up, not re-tokenized.
    (The blue image is below the resolution: the run warns that it is upscaled.)"""
    from sdjax.text import tokenize
    from sdjax.training.data import iterate_batches, load_captioned_images
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (36, 40), (220, 30, 30)).save(root / "red.png")
    Image.new("RGB", (40, 30), (30, 30, 220)).save(root / "blue.png")
    (root / "metadata.jsonl").write_text('{"file_name": "red.png", "text": ["the red dog", "a red square", "red"]}\n'
                                         '{"file_name": "blue.png", "text": "the blue cat"}\n')
    dataset = load_captioned_images(root)
    expected = iterate_batches(dataset, resolution=32, batch_size_per_process=2, seed=0, num_workers=1)
    ids = {}
    for cache in (True, False):
        cfg = TrainConfig(model=str(micro_pipeline_dir), train_data=str(root), output_dir=str(tmp_path / str(cache)),
                          resolution=32, batch_size=1, max_steps=3, cache_latents=cache)
        with pytest.warns(UserWarning, match=re.escape(
                f"{root}: 1 of 2 images are smaller than --resolution 32 on their shorter side (blue.png 30 px): "
                "they are upscaled")):
            trainer = Trainer.create(cfg, mesh=parallel.data_mesh(jax.devices()[:2]))
        try:
            ids[cache] = [np.asarray(trainer.next_batch()["input_ids"])[0] for _ in range(8)]   # 8 epochs of 1 step
            tokenizer = trainer.pipe.tokenizer
            assert f"training data: 2 examples with 4 captions (one per epoch) from {root}" in capsys.readouterr().out
        finally:
            trainer.close()
    captions = [next(expected)["captions"] for _ in range(8)]
    for step, batch_captions in enumerate(captions):
        np.testing.assert_array_equal(ids[True][step], tokenize(tokenizer, batch_captions))
        np.testing.assert_array_equal(ids[False][step], ids[True][step])
    red = {c for batch in captions for c in batch if c != "the blue cat"}
    assert len(red) >= 2 and red <= {"the red dog", "a red square", "red"}
