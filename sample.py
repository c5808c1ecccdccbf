#!/usr/bin/env python
"""Text to images with Stable Diffusion v1.5 in JAX: one PNG per (prompt, seed).

    python sample.py "a photograph of an astronaut riding a horse" --seeds 0-7
    python sample.py --prompts-file prompts.txt --seeds 3,7,9 --config draft --grid
    python sample.py "a red fox in the snow" --steps 90 --guidance-scale 11 --trajectory
    python sample.py "an oil painting of a fox" --init-image fox.png --strength 0.6 --seeds 0-3
    python sample.py "a red hat" --init-image fox.png --mask hat-mask.png --seeds 0-3
    python sample.py --from-png outputs/00003-seed7-a-fox.png --seeds 8-11

Settings come from, in order of precedence: explicit flags, ``--from-png`` (an image's PNG
parameters), a ``--config`` YAML preset (see configs/README.md), the built-in defaults (50 steps,
guidance 7.5, PNDM, 512x512). Each PNG carries its settings in the A1111 "parameters" text chunk.
Bad input exits with status 2 and a one-line message before the model is loaded, leaving --out
untouched.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from sdjax.cli_utils import (COMPILATION_CACHE_HELP, CONTROL_MODES, CONTROLNET_SETTINGS, DEFAULT_MODEL,
                             DTYPE_ALIASES, DTYPES, PROGRESS_MODES, OneLineErrorParser, ReplacingAppend, SampleRequest,
                             UsageError, embeddings_named, extra_network_tags, init_image_size, load_config,
                             loras_of_tags, parse_scheduler_options, parse_seeds, png_notes, read_prompts_file,
                             resolve_config_path, settings_from_png, validate_request)
from sdjax.preprocess import CANNY_HIGH, CANNY_LOW, PREPROCESSORS, PROCESSOR_RES, RESIZE_MODES
from sdjax.sampling import MASKED_CONTENTS
from sdjax.schedulers import SCHEDULERS, option_names

PROG = "sample.py"
CONFIG_DIRS = (Path(__file__).resolve().parent / "configs",)


def _seeds(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description="Generate images from text prompts with Stable Diffusion v1.5 "
                           "(JAX). Flags override a --config preset, which overrides the defaults below.")
    p.add_argument("prompt", nargs="*", help="one or more prompts (each is combined with every seed)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="more prompts, one per line (- reads them from standard input)")
    p.add_argument("--config", metavar="YAML", help="preset of defaults: a file or a name in configs/ (draft, ...)")
    p.add_argument("--from-png", metavar="PNG",
                   help="make an image again: take its prompt, negative prompt, seed, steps, sampler, CFG scale, "
                        "size, clip skip, prompt weighting and Hires fix from its PNG parameters (as AUTOMATIC1111 and "
                        "sample.py write them; an AUTOMATIC1111 JPEG's, WebP's or AVIF's EXIF UserComment; "
                        "an AUTOMATIC1111 image's prompt is weighted); "
                        "flags given override them, a prompt given replaces its prompt")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face Hub repo id, local pipeline folder, or single-file checkpoint "
                        f"(.safetensors / .ckpt in the original SD layout, a path or a Hugging Face Hub file URL; "
                        f"default {DEFAULT_MODEL})")
    p.add_argument("--model-config", metavar="REPO_OR_DIR", default=None,
                   help=f"for a single-file --model: the pipeline folder or Hub repo id whose configs, "
                        f"tokenizer and scheduler config it uses (default: the pipeline folder X/ beside "
                        f"X.safetensors, else {DEFAULT_MODEL})")
    p.add_argument("--vae", metavar="FILE_OR_REPO", default=None,
                   help="a VAE in place of the model's own: a file (vae-ft-mse-840000-ema-pruned.safetensors / "
                        ".ckpt), a VAE folder or Hub repo id (stabilityai/sd-vae-ft-mse), or a pipeline folder")
    p.add_argument("--ema-weights", action=argparse.BooleanOptionalAction, default=False,
                   help="for a single-file --model that holds the UNet twice (a training checkpoint such as "
                        "v1-5-pruned.ckpt: its weights and their EMA copy, model_ema.*): load the EMA copy, usually "
                        "the better one for images (default: the weights, as diffusers' from_single_file)")
    p.add_argument("--variant", default=None,
                   help="load variant weight files, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors "
                        "(about half the download)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from, e.g. 'blurry, low quality' (needs --guidance-scale above 1)")
    p.add_argument("--seeds", type=_seeds, default="0", help="seed, inclusive range (0-15) or list (3,7,9); default 0")
    p.add_argument("--variation-seeds", type=_seeds, default=None, metavar="SEEDS",
                   help="AUTOMATIC1111's variation seeds (range or list, as --seeds): each image's noise moved toward "
                        "each variation seed's by --variation-strength, so --seeds 7 --variation-seeds 0-15 makes 16 "
                        "variations of seed 7's image")
    p.add_argument("--variation-strength", type=float, default=0.0, metavar="X",
                   help="with --variation-seeds: how far each image's noise moves toward its variation seed's, in "
                        "[0, 1] (0.1-0.3: close variations; 1: the variation seed's own image); recorded in the PNG "
                        "parameters")
    p.add_argument("--seed-resize-from", default=None, metavar="WxH",
                   help="AUTOMATIC1111's Seed resize from: draw each seed's noise (and its variation seed's) at "
                        "WIDTHxHEIGHT (multiples of 8) and lay it over the middle of its noise at the images' size, "
                        "so a seed's picture keeps its layout at another --width / --height (default: off)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50, typical 20-100)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5, typical 5-15)")
    p.add_argument("--scheduler", default="pndm",
                   help="pndm (default), ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_sde, lms or ddpm")
    p.add_argument("--scheduler-option", metavar="KEY=VALUE", action="append", default=[],
                   help="a scheduler setting, repeatable: use_karras_sigmas=true (DPM++ 2M Karras, also "
                        "dpmpp_2m_sde, euler and lms), use_exponential_sigmas=true (dpmpp_2m, dpmpp_2m_sde: A1111's "
                        "Exponential), eta=1 (ddim), timestep_spacing=trailing, ... (any diffusers config key of the "
                        "scheduler; the value is read as YAML: true, 1.0, text)")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="condition on the text encoder's N-th layer from the end, as A1111's Clip skip (model "
                        "cards' \"Clip skip: 2\"): 1 (default) the last layer, 2 the penultimate; diffusers' "
                        "clip_skip=k is N=k+1")
    p.add_argument("--prompt-weighting", action=argparse.BooleanOptionalAction, default=False,
                   help="read AUTOMATIC1111's emphasis syntax in the prompts and the negative prompt: (word) "
                        "weights word by 1.1, [word] by 1/1.1, (word:1.5) by 1.5, \\( is a bracket; a prompt past 75 "
                        "tokens and BREAK are read in windows of 75 tokens, prompt editing [cat:dog:0.5] and "
                        "alternation [cat|dog] as the steps go, and AND (composable diffusion: a cat AND a dog:0.5; "
                        "needs --guidance-scale above 1), as A1111 does (default: off, the "
                        "brackets are words and a long prompt is cut, as in diffusers); recorded in the PNG "
                        "parameters")
    p.add_argument("--emphasis", default="original", metavar="MODE",
                   help="with --prompt-weighting, AUTOMATIC1111's Emphasis setting: original (default: weights, the "
                        "mean restored), no-norm (weights as they are), ignore (the syntax read, no weights) or none "
                        "(brackets and BREAK are text; windows, editing and AND still read); recorded in the PNG "
                        "parameters")
    p.add_argument("--lora", metavar="FILE[:SCALE]", action="append", default=[],
                   help="a LoRA .safetensors file (kohya / A1111 or diffusers format) merged into the weights at "
                        "SCALE (default 1.0), repeatable: the LoRAs add up; recorded in the PNG parameters as A1111 "
                        "users write it, <lora:NAME:SCALE> after the prompt")
    p.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="the folder of the LoRAs a prompt names as AUTOMATIC1111's <lora:NAME:SCALE> (as its "
                        "models/Lora): NAME.safetensors in it or a folder below, merged at SCALE; the tags are taken "
                        "out of the prompt, as A1111 does (also an image's, with --from-png)")
    p.add_argument("--init-image", metavar="FILE", default=None,
                   help="img2img: start every image from this picture (PNG, JPEG, ...) instead of pure noise, "
                        "resized to --width x --height when they are given (default: its own size, rounded down to "
                        "multiples of 8)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how much of the schedule runs from --init-image, in (0, 1]: low values keep "
                        "the picture, 1 repaints it (default 0.8, with --mask 1; int(steps x strength) steps run)")
    p.add_argument("--mask", metavar="FILE", default=None,
                   help="inpainting, with --init-image: repaint the white part of the picture and keep the black "
                        "(a grayscale image, resized to the picture's size and cut at half gray); --strength is 1 "
                        "by default then (the white part from pure noise). An inpainting model "
                        "(stable-diffusion-inpainting) sees the mask at every step")
    p.add_argument("--mask-padding", type=int, default=None, metavar="PX",
                   help="with --mask: inpaint only the box around the mask, PX pixels wider on each side (A1111's "
                        "Inpaint area \"Only masked\", its padding 32): the box is made at --width x --height "
                        "(default 512x512) and pasted back into the picture, which keeps its size")
    p.add_argument("--mask-blur", type=float, default=0.0, metavar="PX",
                   help="with --mask: blur the mask by PX pixels (a Gaussian's standard deviation) and lay the "
                        "picture back over each image through the blurred mask, softening the seam around the "
                        "repainted part (AUTOMATIC1111's Mask blur, its default 4; default 0: no blur, the images "
                        "the model's everywhere)")
    p.add_argument("--mask-invert", action=argparse.BooleanOptionalAction, default=False,
                   help="with --mask: repaint its black part and keep its white one (AUTOMATIC1111's Mask mode "
                        "Inpaint not masked: a mask of the subject repaints its surroundings)")
    p.add_argument("--masked-content", default="original", choices=list(MASKED_CONTENTS),
                   help="with --mask: what the repainted part starts from, as AUTOMATIC1111's Masked content: "
                        "original (default: the picture), fill (the picture there painted over with the colours "
                        "around it), latent_noise (so filled, and the seed's noise in its latents) or "
                        "latent_nothing (zeros); "
                        "below --strength 1 (from 1 the part starts from noise all the same)")
    p.add_argument("--controlnet", metavar="PATH", action=ReplacingAppend, default=[],
                   help="a ControlNet that steers the images by --control-image: a diffusers ControlNet folder or "
                        "Hub repo id (lllyasviel/control_v11p_sd15_canny, ...) made for SD 1.x, or a file in the "
                        "original layout (control_v11p_sd15_canny.pth, A1111's models/ControlNet files); repeatable: "
                        "several steer together (A1111's units), their residuals added")
    p.add_argument("--control-image", metavar="FILE", action=ReplacingAppend, default=[],
                   help="with --controlnet: the control image (an edge map, depth map, pose: already processed, as "
                        "the ControlNet reads it; or a picture for --controlnet-module), fitted to --width x --height "
                        "by --controlnet-resize (default: the first one's own size, rounded down to multiples of 8; "
                        "with a preprocessor, its aspect at 512 px on the short side); one a ControlNet, in "
                        "--controlnet's order")
    p.add_argument("--controlnet-scale", type=float, action=ReplacingAppend, default=[], metavar="X",
                   help="with --controlnet: the weight of its residuals (A1111's Control Weight; default 1); "
                        "several ControlNets: one for all, or repeated, one each")
    p.add_argument("--controlnet-start", type=float, action=ReplacingAppend, default=[], metavar="X",
                   help="with --controlnet: the share of the steps it starts steering at (A1111's Guidance Start; "
                        "default 0); one for all, or one each")
    p.add_argument("--controlnet-end", type=float, action=ReplacingAppend, default=[], metavar="X",
                   help="with --controlnet: the share of the steps it stops steering after (A1111's Guidance End; "
                        "default 1); one for all, or one each")
    p.add_argument("--controlnet-mode", action=ReplacingAppend, default=[], choices=list(CONTROL_MODES),
                   help="with --controlnet: AUTOMATIC1111's Control Mode: balanced (default), prompt (My prompt is "
                        "more important: the residuals weighted softly, the shallow ones less) or controlnet "
                        "(ControlNet is more important: so weighted, and steering the prompt's half of guidance "
                        "alone); one for all, or one each"),
    p.add_argument("--controlnet-module", action=ReplacingAppend, default=[], choices=list(PREPROCESSORS),
                   help="with --controlnet: AUTOMATIC1111's preprocessor of the control image: none (default: the "
                        "control image is given processed), canny (its edges, OpenCV's Canny: give a picture) or "
                        "invert (a black drawing on white made white on black); one for all, or one each")
    p.add_argument("--controlnet-resize", action=ReplacingAppend, default=[], choices=list(RESIZE_MODES),
                   help="with --controlnet: how a control image of another aspect is fitted to the images "
                        "(AUTOMATIC1111's Resize Mode): just (Just Resize, default: stretched), crop (Crop and "
                        "Resize: scaled to cover, the middle cut out) or fill (Resize and Fill: scaled to fit "
                        "inside, the rest its border's median colour); one for all, or one each")
    p.add_argument("--controlnet-processor-res", type=int, action=ReplacingAppend, default=[], metavar="PX",
                   help="with --controlnet-module canny: the resolution it finds the edges at, the control image "
                        f"resized so its short side is PX (AUTOMATIC1111's Processor Res; default {PROCESSOR_RES}); "
                        "one for all, or one each")
    p.add_argument("--controlnet-pixel-perfect", action=argparse.BooleanOptionalAction, default=[],
                   help="with --controlnet-module canny: its resolution from the images' size instead, so the edges "
                        "are found at the images' own scale (AUTOMATIC1111's Pixel Perfect), for every ControlNet "
                        "(one each: a preset's list)")
    p.add_argument("--controlnet-canny-low", type=int, action=ReplacingAppend, default=[], metavar="N",
                   help=f"with --controlnet-module canny: its low threshold, 1-255 (default {CANNY_LOW}; "
                        "AUTOMATIC1111's Threshold A); one for all, or one each")
    p.add_argument("--controlnet-canny-high", type=int, action=ReplacingAppend, default=[], metavar="N",
                   help=f"with --controlnet-module canny: its high threshold, 1-255 (default {CANNY_HIGH}; "
                        "AUTOMATIC1111's Threshold B); one for all, or one each")
    p.add_argument("--hires-scale", type=float, default=None, metavar="S",
                   help="AUTOMATIC1111's Hires fix: make each image at --width x --height, enlarge it S times "
                        "(> 1; each side rounded down to a multiple of 8) and denoise it again at that size "
                        "(default: off)")
    p.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="Hires fix: the second pass's steps (default: --steps)")
    p.add_argument("--hires-strength", type=float, default=None, metavar="X",
                   help="Hires fix: the second pass's denoising strength in (0, 1], the share of its schedule run "
                        "(default 0.7, as A1111's)")
    p.add_argument("--hires-upscaler", default=None, metavar="latent|lanczos",
                   help="Hires fix: latent (default, A1111's Latent: the latents resized bilinearly) or lanczos "
                        "(the image decoded, resized with Lanczos and encoded again)")
    p.add_argument("--hires-scheduler", default=None, metavar="NAME",
                   help="Hires fix: the second pass's scheduler (A1111's Hires sampler; default: --scheduler), with "
                        "the --scheduler-option settings it has (A1111's Use same scheduler)")
    p.add_argument("--hires-scheduler-option", metavar="KEY=VALUE", action="append", default=[],
                   help="Hires fix: a setting of the second pass's scheduler, over --scheduler-option's, repeatable: "
                        "use_karras_sigmas=true (A1111's Hires schedule type Karras), ...")
    p.add_argument("--hires-guidance-scale", type=float, default=None, metavar="G",
                   help="Hires fix: the second pass's guidance scale (Forge's Hires CFG Scale; default: "
                        "--guidance-scale)")
    p.add_argument("--hires-prompt", default=None, metavar="TEXT",
                   help="Hires fix: the second pass's prompt, every image's (A1111's Hires prompt; default or "
                        "empty: the image's prompt)")
    p.add_argument("--hires-negative-prompt", default=None, metavar="TEXT",
                   help="Hires fix: the second pass's negative prompt (default or empty: --negative-prompt)")
    p.add_argument("--embedding-dir", metavar="DIR", default=None,
                   help="the folder of the textual inversion embeddings a prompt or the negative prompt names by "
                        "their file names, as AUTOMATIC1111's embeddings folder: each file there (or in a folder "
                        "below) whose name a prompt has as a word, in any letter case, is loaded as --embedding is")
    p.add_argument("--embedding", metavar="FILE", action="append", default=[],
                   help="repeatable: a textual inversion embedding (.safetensors, .pt, .bin; AUTOMATIC1111's or "
                        "diffusers') added to the text encoder; use it by its token in a prompt or negative prompt: "
                        "the file's name for A1111's (EasyNegative.safetensors -> EasyNegative), the token inside "
                        "for diffusers'")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of 8 (default 512, or --init-image's height)")
    p.add_argument("--width", type=int, default=None,
                   help="pixels, a multiple of 8 (default 512, or --init-image's width)")
    p.add_argument("--dtype", default=None, help=f"{' / '.join(DTYPES)} (or {' / '.join(DTYPE_ALIASES)}); default "
                                                 "bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="images per compiled call (default 4 per device)")
    p.add_argument("--out", default="outputs", help="output folder (default outputs)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=False, help="also write NNNNN-grid.png (all the images of the run)")
    p.add_argument("--save-control-images", action=argparse.BooleanOptionalAction, default=False,
                   help="with --controlnet: also write each ControlNet's control image as it was made (its "
                        "preprocessor's map, fitted to the images), NNNNN-controlK.png, K in --controlnet's order")
    p.add_argument("--trajectory", action=argparse.BooleanOptionalAction, default=False,
                   help="also write a denoising strip (PNG) and animation (GIF) per image")
    p.add_argument("--trajectory-frames", type=int, default=8, metavar="N",
                   help="frames in each trajectory strip and GIF: the noise, evenly spaced steps and the image "
                        "(at most N, default 8)")
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                   help="progress bar over denoising steps or batches; auto (default): steps on the CPU, "
                        "batches on GPU/TPU")
    p.add_argument("--compilation-cache", metavar="DIR", default=None, help=COMPILATION_CACHE_HELP)
    return p


def parse_request(argv=None) -> tuple[SampleRequest, argparse.Namespace]:
    """Parse twice: first only --config, whose keys become the parser's defaults, then everything
    (so explicit flags override the preset). Raises UsageError on any bad input."""
    pre = OneLineErrorParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--from-png")
    pre.add_argument("--strength")   # (given on the command line, not by the preset: over --from-png's)
    pre.add_argument("--hires-scale")
    pre.add_argument("--hires-prompt")
    pre.add_argument("--mask-padding")
    pre.add_argument("--mask-blur")
    pre.add_argument("--masked-content")
    pre.add_argument("--mask-invert", action=argparse.BooleanOptionalAction, default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    preset, path = {}, None
    if known.config is not None:
        path = resolve_config_path(known.config, CONFIG_DIRS, other_tools={"train.py": CONFIG_DIRS[0] / "train"})
        preset = load_config(path)
        parser.set_defaults(**preset)   # (a preset's lora list: --lora flags add to it)
    png = None
    if known.from_png is not None:   # over the preset, under the flags
        png = settings_from_png(known.from_png)
        parser.set_defaults(**png.flags)
    args = parser.parse_args(argv)
    args.preset, args.preset_path = preset, path   # for errors found later in a value the preset gave
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    hires_prompt_note = None
    if png is not None and not prompts:
        prompts = [png.prompt]
    elif png is not None:   # a prompt given replaces the image's, and with it the LoRAs its tags named
        png = dataclasses.replace(png, loras=[])
        if "hires_prompt" in png.flags and known.hires_prompt is None:   # (and its Hires prompt)
            args.hires_prompt = None
            hires_prompt_note = ("--from-png: the image's Hires prompt is left out: the prompt given is both "
                                 "passes' (give --hires-prompt for the second pass's own)")
    strength = args.strength
    if png is not None and png.strength is not None and known.strength is None and args.init_image is not None:
        strength = png.strength   # (over a preset's strength, as every --from-png setting is)
    # A1111's <lora:NAME:SCALE> tags: out of the prompts, their files (--lora-dir) into --lora
    # (prompts naming different LoRAs: each run of them is made with its own, req.prompt_loras)
    tagged = [extra_network_tags(prompt) for prompt in prompts]
    prompts = [prompt for prompt, _, _ in tagged]
    hires_tagged = None   # (the Hires prompt's: sdjax makes both passes with the prompts' LoRAs)
    if args.hires_prompt:
        hires_tagged = extra_network_tags(args.hires_prompt)
        args.hires_prompt = hires_tagged[0]
    try:
        by_tags = {}   # each set of tags' files (in any order: they add up)
        for _, tags, _ in tagged or [(None, [], None)]:
            if tuple(sorted(tags)) not in by_tags:
                by_tags[tuple(sorted(tags))] = loras_of_tags(tags, args.lora_dir, args.lora)
        prompt_loras = [by_tags[tuple(sorted(tags))] for _, tags, _ in tagged] if len(by_tags) > 1 else []
        found = [] if prompt_loras else next(iter(by_tags.values()))
        if png is not None and args.lora_dir is not None:   # the image's LoRAs, from the folder (once)
            tagged_files = [text for loras in prompt_loras for text in loras]
            found += loras_of_tags(png.loras, args.lora_dir, [*args.lora, *found, *tagged_files])
        named = embeddings_named([*prompts, args.negative_prompt, args.hires_prompt or "",
                                  args.hires_negative_prompt or ""], args.embedding_dir, args.embedding)
    except UsageError as e:
        raise _from_the_preset(e, preset, path, args, sys.argv[1:] if argv is None else argv) from None
    args.lora, args.embedding = [*args.lora, *found], [*args.embedding, *named]
    # (a file that fails to load later is said of the folder it came from, not of a --lora / --embedding flag)
    args.prompt_loras = prompt_loras
    args.from_folder = {**dict.fromkeys([*found, *(text for loras in prompt_loras for text in loras)], "lora_dir"),
                        **dict.fromkeys(named, "embedding_dir")}
    args.png_notes = [] if png is None else png_notes(png, args)
    if hires_prompt_note:
        args.png_notes.append(hires_prompt_note)
    prompt_tags = [png.loras] if png is not None and png.loras else [tags for _, tags, _ in tagged]
    if hires_tagged is not None and any(sorted(hires_tagged[1]) != sorted(tags) for tags in prompt_tags):
        listed = " ".join(f"<lora:{name}:{scale:g}>" for name, scale in hires_tagged[1]) or "none"
        args.png_notes.append(f"the Hires prompt's LoRA tags ({listed}) are not the prompt's: sdjax makes both "
                              "passes with the prompt's LoRAs")
    if others := sorted({tag for _, _, networks in [*tagged, *([hires_tagged] if hires_tagged else [])]
                         for tag in networks}):
        args.png_notes.append(f"the prompt's extra networks {', '.join(others)} have no sdjax equivalent: left out "
                              "of it")
    if png is not None and "hires_scale" in png.flags and args.init_image is not None and known.hires_scale is None:
        # an img2img run from a Hires fix image: the picture given replaces its first pass
        for name in ("hires_scale", "hires_steps", "hires_strength", "hires_upscaler", "hires_scheduler",
                     "hires_guidance_scale", "hires_prompt", "hires_negative_prompt"):
            if getattr(args, name) == png.flags.get(name):
                setattr(args, name, None)
        if getattr(args, "hires_scheduler_options", None) == png.flags.get("hires_scheduler_options"):
            args.hires_scheduler_options = {}
        args.png_notes.append(f"--from-png: the image's Hires fix (Hires upscale {png.flags['hires_scale']:g}) is "
                              "left out: --init-image makes img2img of that picture instead")
    seeds = args.seeds if isinstance(args.seeds, list) else parse_seeds(args.seeds)
    variation_seeds = (args.variation_seeds if isinstance(args.variation_seeds, list) or args.variation_seeds is None
                       else parse_seeds(args.variation_seeds)) or []
    given_options = parse_scheduler_options(args.scheduler_option)
    options = {**getattr(args, "scheduler_options", {}), **given_options}
    given_hires = parse_scheduler_options(args.hires_scheduler_option, "--hires-scheduler-option")
    hires_options = {**getattr(args, "hires_scheduler_options", {}), **given_hires}
    imaged = {} if png is None else png.flags.get("hires_scheduler_options", {})
    if imaged and (args.hires_scheduler or args.scheduler) in SCHEDULERS:   # (another second-pass scheduler's)
        takes = option_names(args.hires_scheduler or args.scheduler)
        if dropped := {k: v for k, v in imaged.items() if k not in takes and k not in given_hires
                       and hires_options.get(k) == v}:
            hires_options = {k: v for k, v in hires_options.items() if k not in dropped}
            listed = ", ".join(f"{k}={v}" for k, v in dropped.items())
            args.png_notes.append(f"--from-png: the image's Hires scheduler options {listed} are left out: the "
                                  f"{args.hires_scheduler or args.scheduler} scheduler has none such")
    schedules = ("use_karras_sigmas", "use_exponential_sigmas")   # (only one of them can be used)
    if any(given_options.get(key) for key in schedules):   # a schedule given replaces the preset's / the image's
        replaced = {k: v for k, v in options.items() if k in schedules and k not in given_options and v}
        options = {k: v for k, v in options.items() if k not in replaced}
        imaged = {} if png is None else png.flags.get("scheduler_options", {})
        if from_image := {k: v for k, v in replaced.items() if imaged.get(k) == v}:
            listed = ", ".join(f"{k}={v}" for k, v in from_image.items())
            args.png_notes.append(f"--from-png: the image's scheduler options {listed} are left out: "
                                  "--scheduler-option gives another schedule")
    if png is not None and args.scheduler != png.flags.get("scheduler"):
        # another scheduler than the image's: its options that this one has no use for are left out
        # (a Karras image varied with --scheduler euler_a), not an error about a flag the user did not give
        from sdjax.schedulers import resolve_scheduler_config
        valid = set(resolve_scheduler_config(args.scheduler, {}))
        if args.scheduler not in ("dpmpp_2m", "dpmpp_2m_sde"):   # (diffusers' Euler and LMS have them; sdjax's not)
            valid.discard("use_exponential_sigmas")
        imaged = png.flags.get("scheduler_options", {})
        dropped = {k: v for k, v in imaged.items() if k not in valid and k not in given_options and options.get(k) == v}
        if dropped:
            options = {k: v for k, v in options.items() if k not in dropped}
            listed = ", ".join(f"{k}={v}" for k, v in dropped.items())
            args.png_notes.append(f"--from-png: the image's scheduler options {listed} are left out: the "
                                  f"{args.scheduler} scheduler has none such")
    if png is not None and "mask_padding" in png.flags and args.mask is None and known.mask_padding is None:
        args.mask_padding = None   # (an "Only masked" image's, without its mask: the note says to pass --mask)
    if png is not None and "mask_blur" in png.flags and args.mask is None and known.mask_blur is None:
        args.mask_blur = 0.0   # (likewise an inpainted image's Mask blur)
    if png is not None and "masked_content" in png.flags and args.mask is None and known.masked_content is None:
        args.masked_content = "original"   # (and its Masked content)
    if png is not None and "mask_invert" in png.flags and args.mask is None and known.mask_invert is None:
        args.mask_invert = False   # (and its Mask mode)
    if isinstance(args.controlnet_pixel_perfect, bool):   # (the flag: for every ControlNet)
        args.controlnet_pixel_perfect = [args.controlnet_pixel_perfect]
    try:   # an init image sets the size that is not given: its own, rounded down to multiples of 8
        own_size = args.init_image is not None and args.mask_padding is None   # (only masked: the box's size)
        size = (init_image_size(args.init_image) if own_size
                else init_image_size(args.control_image[0], "control_image") if args.control_image
                else (512, 512))
    except UsageError as e:
        raise _from_the_preset(e, preset, path, args, sys.argv[1:] if argv is None else argv) from None
    if not own_size and args.control_image and (args.controlnet_module or ["none"])[0] != "none":
        # (a picture for a preprocessor, a photo of any size: its aspect at SD v1.5's 512 px on the short side)
        size = tuple(round(side * 512 / min(size)) for side in size)
    height, width = (size[i] // 8 * 8 if given is None else given for i, given in ((1, args.height), (0, args.width)))
    emphasis = str(args.emphasis).strip().lower().replace("-", "_").replace(" ", "_")   # (also A1111's "No norm")
    given = sys.argv[1:] if argv is None else argv
    if not args.prompt_weighting and "--no-prompt-weighting" in map(str, given) \
            and not any(str(a).startswith("--emphasis") for a in given):
        emphasis = "original"   # (an image's or a preset's, under --no-prompt-weighting: nothing to set; a
        # preset's emphasis without its prompt_weighting is an error that names the preset, as a flag's is)
    req = SampleRequest(prompts=prompts, seeds=seeds, negative_prompt=args.negative_prompt, model=args.model,
                        model_config=args.model_config, vae=args.vae, ema_weights=args.ema_weights,
                        scheduler_options=options, clip_skip=args.clip_skip, lora=list(args.lora),
                        prompt_loras=args.prompt_loras,
                        prompt_weighting=args.prompt_weighting,
                        emphasis=emphasis, variation_seeds=variation_seeds,
                        seed_resize_from=args.seed_resize_from,
                        variation_strength=args.variation_strength,
                        embedding=list(args.embedding),
                        steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                        init_image=args.init_image, strength=strength, mask=args.mask,
                        mask_padding=args.mask_padding, mask_blur=args.mask_blur,
                        masked_content=args.masked_content, mask_invert=args.mask_invert,
                        controlnet=list(args.controlnet),
                        control_image=list(args.control_image),
                        **{name: list(getattr(args, name)) for name in CONTROLNET_SETTINGS},
                        hires_scale=args.hires_scale,
                        hires_steps=args.hires_steps, hires_strength=args.hires_strength,
                        hires_upscaler=args.hires_upscaler, hires_scheduler=args.hires_scheduler,
                        hires_scheduler_options=hires_options, hires_guidance_scale=args.hires_guidance_scale,
                        hires_prompt=args.hires_prompt, hires_negative_prompt=args.hires_negative_prompt,
                        height=height, width=width, dtype=DTYPE_ALIASES.get(args.dtype, args.dtype),
                        batch_size=args.batch_size, variant=args.variant,
                        out=str(Path(args.out).expanduser()) if str(args.out).strip() else args.out,
                        grid=args.grid, save_control_images=args.save_control_images, trajectory=args.trajectory,
                        trajectory_frames=args.trajectory_frames)
    try:
        if not req.controlnet:   # (a ControlNet's settings given on their own; an image's are its own business)
            given_argv = [str(a).split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
            reason = "is a ControlNet's setting: give --controlnet and --control-image too"
            for name in CONTROLNET_SETTINGS:
                flag = f"--{name.replace('_', '-')}"
                if f"--no-{flag[2:]}" in given_argv:   # (a switch turned off)
                    flag = f"--no-{flag[2:]}"
                if flag in given_argv:
                    values = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in getattr(args, name)
                                      if not isinstance(v, bool))   # (a switch: the flag alone)
                    raise UsageError(f"{flag} {values}".strip() + f": {reason}", setting=name, reason=reason)
                if name in preset:   # (the preset's, though an image's value may stand in its place)
                    raise UsageError(f"{path}: key {name!r} {reason}")
        elif not any(unit.module == "canny" for unit in req.control_units):   # (canny's settings, given for none)
            given_argv = [str(a).split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
            reason = "is the canny preprocessor's setting: give --controlnet-module canny too"
            for name in ("controlnet_processor_res", "controlnet_canny_low", "controlnet_canny_high",
                         "controlnet_pixel_perfect"):
                flag = f"--{name.replace('_', '-')}"
                if flag in given_argv and getattr(args, name) != [False]:
                    raise UsageError(f"{flag}: {reason}", setting=name, reason=reason)
                if name in preset and preset[name] not in (False, [False]):   # (Pixel Perfect off: nothing to say)
                    raise UsageError(f"{path}: key {name!r} {reason}")
        validate_request(req)
    except UsageError as e:
        argv = sys.argv[1:] if argv is None else argv
        raise _from_the_png(_from_the_preset(e, preset, path, args, argv), png, known.from_png, args, argv) from None
    return req, args


def _from_the_png(error: UsageError, png, file, args, argv) -> UsageError:
    """``--height 700: must be ...`` when the 700 came from --from-png's image (its Size): name the
    image instead of a flag the user did not type."""
    return _blame_the_source(error, {} if png is None else png.flags, args, argv,
                             lambda key, value: f"--from-png {file}: its {key} {value!r}")


def _from_the_preset(error: UsageError, preset: dict, path, args, argv) -> UsageError:
    """``--height 30: must be ...`` when the 30 came from the --config file: name the file and key
    instead of a flag the user did not type."""
    return _blame_the_source(error, preset, args, argv, lambda key, value: f"{path}: key {key!r} has value {value!r}")


def _blame_the_source(error: UsageError, settings: dict, args, argv, source) -> UsageError:
    """``error`` about a setting whose value came from ``settings`` (a preset's, an image's) and was not
    given as a flag in ``argv``: said of ``source(key, value)`` instead of the flag; else as it is."""
    key = error.setting
    if key is None or key not in settings:
        return error
    value = getattr(args, key, None)
    if not (value is settings[key] or value == settings[key]):   # (is: NaN != NaN)
        return error
    flag = "--" + key.replace("_", "-").replace("scheduler-options", "scheduler-option")
    if any(a == flag or a.startswith(flag + "=") for a in map(str, argv)):
        return error
    return UsageError(f"{source(key, settings[key])}: {error.reason}")


def _file_error(error: Exception, setting: str, value: str, args, argv) -> Exception:
    """``--lora FILE: ...`` for a file that did not load; ``--lora-dir DIR: FILE: ...`` (or the preset's
    ``lora_dir``) for one that a --lora-dir / --embedding-dir folder gave."""
    from sdjax.weights import CheckpointError
    folder = args.from_folder.get(value)
    if folder is None:
        return CheckpointError(f"--{setting} {error}")
    return _from_the_preset(UsageError(f"--{folder.replace('_', '-')} {getattr(args, folder)}: {error}",
                                       setting=folder, reason=str(error)),
                            args.preset, args.preset_path, args, sys.argv[1:] if argv is None else argv)


def _fail(error: Exception) -> int:
    # one line: a strict-loading error's lines (missing keys, unexpected keys) become clauses
    message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _cannot_begin_midway(scheduler, steps: int, strength: float) -> str | None:
    """Why ``scheduler`` cannot begin its schedule midway, where img2img at ``strength`` enters it (PNDM's
    Runge-Kutta warm-up cannot), or None."""
    from sdjax.sampling import img2img_start
    try:
        scheduler.starting_at(img2img_start(steps, strength))
    except (ValueError, NotImplementedError) as e:
        return str(e)
    return None


def main(argv=None) -> int:
    try:
        req, args, problem = *parse_request(argv), None
    except UsageError as e:
        req, args, problem = None, None, e
    import jax
    from sdjax import parallel
    if problem is not None and not (parallel.env_says_multi_process() or jax.distributed.is_initialized()):
        return _fail(problem)
    from sdjax.cli_utils import (attention_memory_advice, count, default_dtype, enable_compilation_cache,
                                 interruption, out_of_memory, run_sampling, show_warnings_as_lines)
    show_warnings_as_lines("sample.py")
    import warnings
    for note in getattr(args, "png_notes", ()):   # what --from-png could not take over
        warnings.warn(note)
    if req is not None and len(set(req.seeds)) < len(req.seeds):
        import collections
        repeated = [seed for seed, n in collections.Counter(req.seeds).items() if n > 1]
        warnings.warn(f"--seeds repeats {', '.join(map(str, repeated[:5]))}{', ...' if len(repeated) > 5 else ''}: "
                      "a repeated seed makes the same image again")
    if req is not None and req.masked_content.startswith("latent") and req.img2img_strength == 1:
        warnings.warn(f"--masked-content {req.masked_content}: at --strength 1 the part starts from noise whatever "
                      "its latents (as in diffusers), so this makes the image fill would: give --strength below 1")
    # Several hosts (a TPU pod, srun, mpirun): the same command on each; the seeds are split over
    # every device of every host, and process 0 writes the images. Before JAX touches a device.
    try:
        parallel.initialize_distributed()
    except ValueError as e:
        return _fail(e)
    main_process = jax.process_index() == 0
    if jax.process_count() > 1:
        # Every process must make the same images: each computes its devices' part of every batch,
        # and process 0 names and writes them all. A host whose request failed or differs stops all.
        failed = parallel.processes_that_failed(problem is None)
        if problem is not None:
            return _fail(problem)
        if failed:
            return _fail(UsageError(f"processes {', '.join(map(str, failed))} of {jax.process_count()} could not "
                                    "read the request (their logs say why)"))
        requests = parallel.gather_from_processes(req.fingerprint())
        other = [i for i, r in enumerate(requests) if (r != requests[0]).any()]
        if other:
            return _fail(UsageError(
                f"processes {', '.join(map(str, other))} of {jax.process_count()} were given other prompts, seeds or "
                "settings than process 0: start the same command on every host (with --prompts-file -, give "
                "every task the input: srun --input=all)"))
    enable_compilation_cache(args.compilation_cache)  # before anything compiles

    from sdjax.pipeline import load_pipeline
    from sdjax.weights import CheckpointError
    dtype = req.dtype or default_dtype()
    t0 = time.perf_counter()
    try:
        pipe, error = load_pipeline(req.model, model_config=req.model_config, dtype=dtype, variant=req.variant,
                                    vae=req.vae, ema_weights=req.ema_weights), None
    except CheckpointError as e:  # no weights reachable, or not a pipeline folder: before anything is written
        pipe, error = None, e
    if error is None:
        from sdjax.cli_utils import parse_lora
        for text in req.lora:   # merged into the weights, in turn; a file that is no LoRA: before anything is written
            try:
                pipe.fuse_lora(*parse_lora(text))
            except CheckpointError as e:
                error = _file_error(e, "lora", text, args, argv)   # (its message starts with the file)
                break
        from sdjax.weights import read_lora
        configs = {"unet": pipe.unet.config, "text_encoder": pipe.text_encoder.config}
        for text in dict.fromkeys(t for loras in req.prompt_loras for t in loras) if error is None else ():
            try:   # (the prompts' other LoRAs, fused in turn as their prompts are made: read now all the same)
                read_lora(parse_lora(text)[0], configs)
            except CheckpointError as e:
                error = _file_error(e, "lora", text, args, argv)
                break
    tokens = []
    for file in req.embedding if error is None else ():   # the same: before anything is written
        try:
            tokens.append(pipe.load_textual_inversion(file))
        except CheckpointError as e:
            error = _file_error(e, "embedding", file, args, argv)
            break
    controlnets = []   # (a ControlNet of another model: before anything is written)
    for path in req.controlnet if error is None else ():
        try:
            controlnets.append(pipe.load_controlnet(path, variant=req.variant))
        except (CheckpointError, OSError, ValueError, NotImplementedError) as e:
            error = CheckpointError(f"--controlnet {path}: {e}")
            break
    if error is None and len(controlnets) > 1:   # (several: together, their residuals added)
        pipe.load_controlnet(controlnets)
    failed = parallel.processes_that_failed(error is None)   # a host without the weights stops them all
    if error is not None:
        return _fail(error)
    if failed:
        extras = ", its LoRAs, embeddings or ControlNet" if req.lora or req.embedding or req.controlnet else ""
        return _fail(CheckpointError(f"{req.model}: processes {', '.join(map(str, failed))} of "
                                     f"{jax.process_count()} could not load the model{extras} (their logs say why); "
                                     "every host needs the weights"))
    try:  # steps the model's noise schedule cannot take (e.g. 1000 with SD's steps_offset=1)
        pipe.make_scheduler(req.scheduler, req.steps)
    except (ValueError, NotImplementedError) as e:
        return _fail(e)
    try:  # then the option values (eta=2, timestep_spacing=bogus, solver_order=3)
        sched = pipe.make_scheduler(req.scheduler, req.steps, **req.scheduler_options)
    except (ValueError, NotImplementedError, TypeError) as e:
        options = ", ".join(f"{k}={v!r}" for k, v in req.scheduler_options.items())
        error = UsageError(f"--scheduler-option {options}: {e}", setting="scheduler_options", reason=str(e))
        return _fail(_from_the_preset(error, args.preset, args.preset_path, args, sys.argv[1:] if argv is None else argv))
    if req.hires is not None:   # the Hires fix's second pass's scheduler, and the first pass's options it takes
        hires = req.hires
        name2, options2 = hires.second_scheduler(req.scheduler, req.scheduler_options)
        try:
            sched2 = pipe.make_scheduler(name2, hires.steps or req.steps, **options2)
        except (ValueError, NotImplementedError, TypeError) as e:
            options = ", ".join(f"{k}={v!r}" for k, v in options2.items())
            error = UsageError(f"--hires-scheduler {name2} with {options} (the --scheduler-option settings it takes "
                               f"and --hires-scheduler-option's): {e}", setting="hires_scheduler_options",
                               reason=str(e))
            return _fail(_from_the_preset(error, args.preset, args.preset_path, args,
                                          sys.argv[1:] if argv is None else argv))
        midway = _cannot_begin_midway(sched2, hires.steps or req.steps, hires.strength)  # (the pass is img2img)
        if midway:
            return _fail(UsageError(f"--hires-scale {hires.scale:g}: {midway} (the Hires fix's second pass begins its "
                                    f"schedule midway, at --hires-strength {hires.strength:g}): use another "
                                    "--hires-scheduler"))
    midway = req.img2img_strength is not None and _cannot_begin_midway(sched, req.steps, req.img2img_strength)
    if midway:
        return _fail(UsageError(f"--init-image {req.init_image}: {midway} (img2img begins the schedule midway at "
                                f"--strength {req.img2img_strength:g}): use --strength 1 or another --scheduler"))
    from sdjax.cli_utils import clip_skip_problem
    error = clip_skip_problem(req.clip_skip, pipe)   # past this model's text encoder layers
    if error is not None:
        given = sys.argv[1:] if argv is None else argv
        return _fail(_from_the_preset(error, args.preset, args.preset_path, args, given))
    if main_process:
        if tokens:
            print(f"embeddings (write them in a prompt to use them): {', '.join(tokens)}")
        print(f"loaded {req.model} ({dtype}) in {time.perf_counter() - t0:.1f} s; "
              f"{count(len(req.jobs), 'image')}: {count(len(req.prompts), 'prompt')} x {count(len(req.seeds), 'seed')}"
              + (f" x {count(len(req.variation_seeds), 'variation seed')}" if req.variations[0] is not None else "")
              + (f" on {jax.process_count()} processes, {jax.device_count()} devices" if jax.process_count() > 1
                 else ""))
    try:
        result = run_sampling(pipe, req, progress=args.progress)
    except jax.errors.JaxRuntimeError as e:
        message = out_of_memory(e, f"make fewer images per compiled call (--batch-size; default 4 per device), "
                                   f"smaller ones (--height, --width) or use --dtype bfloat16"
                                   f"{attention_memory_advice()}. The images written before this are in {req.out}")
        if message is None:
            raise
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except OSError as e:        # a full disk, a folder removed mid-run
        print(f"{PROG}: error: cannot write the images: {e}; any images written before it are in {req.out}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:   # each image is written whole (a temporary file renamed into place)
        stopped, code = interruption(e)
        print(f"\n{PROG}: {stopped}; any images written before it are in {req.out}", file=sys.stderr)
        return code
    if main_process:
        print(f"wrote {count(len(result.files) + len(result.extra_files), 'file')} to {req.out}")
        print(result.summary())
    return 0


if __name__ == "__main__":
    import signal
    from sdjax.cli_utils import interruption, raise_terminated
    signal.signal(signal.SIGTERM, raise_terminated)   # a job's time limit, kill: stop as Ctrl-C does (exit 143)
    try:
        code = main()
    except KeyboardInterrupt as e:   # while loading: nothing written yet
        stopped, code = interruption(e)
        print(f"\n{PROG}: {stopped}", file=sys.stderr)
    if code in (130, 143):
        from sdjax.cli_utils import exit_after_interrupt
        exit_after_interrupt(code)
    sys.exit(code)
