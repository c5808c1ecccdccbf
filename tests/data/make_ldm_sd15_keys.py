"""Writes ldm_sd15_keys.tsv: every weight name and PyTorch shape of the UNet and the VAE of an SD v1.5
single-file checkpoint, as the original code builds them (CompVis latent-diffusion's ``UNetModel``,
``Encoder`` and ``Decoder`` with the settings of SD v1.5's ``v1-inference.yaml``). test_single_file.py
checks sdjax's single-file names against it.

That code is not installable beside this project's pins (its package pins transformers 4 and
pytorch-lightning 1.4), so it is run once, from its own folder, and its output is kept here:

    pip install --no-deps --target /tmp/ldm_site stable-diffusion-sdkit==2.1.5 einops omegaconf \\
        antlr4-python3-runtime==4.9.3
    PYTHONPATH=/tmp/ldm_site python tests/data/make_ldm_sd15_keys.py > tests/data/ldm_sd15_keys.tsv

(stable-diffusion-sdkit packages Stability AI's stablediffusion repository, whose ``ldm`` modules
build SD v1.x models too: ``legacy=False``, no linear transformer projections.) The text encoder is
transformers' CLIPTextModel under ``cond_stage_model.transformer.``, names unchanged, so it is not
listed here.
"""
import contextlib
import io

import torch

with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):  # ldm prints as it imports and builds
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                     attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
                     use_spatial_transformer=True, transformer_depth=1, context_dim=768, use_checkpoint=False,
                     legacy=False)
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    # ldm.models.autoencoder.AutoencoderKL's modules (the class itself needs pytorch-lightning)
    vae = torch.nn.ModuleDict(dict(encoder=Encoder(**ddconfig), decoder=Decoder(**ddconfig),
                                   quant_conv=torch.nn.Conv2d(8, 8, 1), post_quant_conv=torch.nn.Conv2d(4, 4, 1)))
for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae)):
    for name, tensor in module.state_dict().items():
        print(f"{prefix}{name}\t{'x'.join(map(str, tensor.shape))}")
