"""One line of help per TrainConfig key, shown by `lmfusion train --help` next to its default.

Kept beside config.py rather than in it so the dataclass stays one screen; a test checks that
every field has a line here.
"""

FIELD_HELP: dict[str, str] = {
    "name": "run name: the run folder is <runs_dir>/<name>",
    "runs_dir": "folder that holds run folders",
    "seed": "seed for initialisation, data order and diffusion noise",
    "base_model": "base model: 'smollm2-135m', a HuggingFace hub id or a local folder; a causal LM or a LLaVA-family VLM",
    "mode": "lmfusion | ffn_only | dense | scratch (paper section 5.1 ablation)",
    "image_size": "image side in pixels",
    "patch_size": "latent cells per patch side (tokens per image = (latent side / patch)^2)",
    "codec": "image codec as a mapping, e.g. '{name: taef2, path: ...}'",
    "model": "further LMFusionConfig fields, merged over the preset's, e.g. '{unet_channels: 64, diffusion_loss_weight: 5}'",
    "data": "dataset folder or file of images + captions",
    "generate_shapes": "> 0: create a shapes dataset of this many images at `data` if it is missing",
    "shapes_two_object_prob": "share of generated shapes scenes with two objects (else one)",
    "generate_shapes_edits": "> 0: create a shapes editing set of this many triples at `data` (with task chat: at "
                             "`chat_edit_data`) if it is missing",
    "generate_shapes_chat": "> 0: create a shapes chat set of this many conversations at `data` if it is missing "
                            "(its text replies are the base model's own)",
    "task": "auto | caption | edit | chat: what `data` holds (auto: editing triples when it has an edits.jsonl, "
            "conversations when it has a chat.jsonl)",
    "chat_edit_data": "task chat: an editing set (shapes-edits layout) mixed into the conversations",
    "chat_edit_ratio": "task chat: share of examples that are edits from chat_edit_data",
    "chat_clean_stop_ratio": "task chat: share of one-image conversations whose image enters clean with no diffusion "
                             "loss, so the stop after a finished image is learnt as the sampler meets it (0 = none)",
    "edit_dropout": "editing: share of examples whose instruction, source, or both are dropped, each (two-way guidance)",
    "init_from": "run, checkpoint or model folder whose adapter weights are loaded before step 0 ('' = fresh)",
    "max_text_tokens": "captions are cut to this many tokens",
    "image_first_ratio": "share of examples with the image before its caption (captioning)",
    "caption_dropout": "share of caption-first examples whose caption is dropped (for CFG)",
    "text_only_ratio": "share of examples that are plain text (no image)",
    "text_data": "text file, one document per line, for text-only examples ('' = captions)",
    "latent_cache": "folder of pre-encoded latents ('' = the default cache, 'none' = off)",
    "memory_cache_limit_mb": "datasets whose fp32 latents exceed this many MiB are encoded to latent shards "
                             "in latent_cache and streamed from disk instead of held in memory",
    "data_workers": "DataLoader worker processes that build the next steps' batches (0 = in the training process)",
    "max_steps": "optimizer steps to train",
    "batch_size": "examples per optimizer step, over all processes",
    "micro_batch_size": "examples per forward pass and process (0 = batch_size / processes)",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine decay",
    "fresh_lr_scale": "lr multiplier for fresh modules (U-Net in/out, timestep MLP, BOI/EOI rows)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay, on matrices only",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "ema_decay": "> 0: also keep an exponential moving average of the trainable weights, with this decay as its cap "
                 "(diffusers' EMAModel warm-up: min(decay, (1 + n) / (10 + n)) after n steps), saved as each "
                 "checkpoint's ema/ model folder; 0 = off",
    "precision": "fp32 | bf16 | auto (bf16 autocast, weights and optimizer staying fp32; auto: bf16 on a GPU "
                 "with bf16 or a CPU with AVX-512-BF16 or AMX, where it is faster, else fp32)",
    "pack_length": "> 0: pack each micro-batch's examples, whole and in order, into rows of exactly this many "
                   "tokens (each example attends only within itself; padding only at row ends); 0: one padded row per example",
    "attention": "attention kernel for training: sdpa (dense mask; CPU and short rows) or flex (flex_attention with a "
                 "block-sparse mask; needs a GPU to train, torch has no CPU backward for it)",
    "skip_frozen_context": "run text that nothing trainable precedes (captions before their image, padding) without an "
                           "autograd graph: same gradients, fewer FLOPs and less activation memory, but on 2 CPU cores "
                           "the quickstart step was 5-8% slower (benchmarks/results/quickstart_profile.md)",
    "compile": "torch.compile each fused decoder layer (after activation checkpointing, before FSDP); pays off on a GPU",
    "gradient_checkpointing": "recompute each fused layer's activations in backward to save memory",
    "parallel": "with several processes (torchrun): ddp replicates the model, fsdp shards it (FSDP2)",
    "threads": "torch intra-op threads (0 = torch's default)",
    "log_every": "log a line every this many steps",
    "checkpoint_every": "save a checkpoint every this many steps (0 = only at the end)",
    "keep_checkpoints": "checkpoints kept (older ones are deleted)",
    "sample_every": "write sample images and captions every this many steps (0 = never)",
    "sample_prompts": "prompts for the sample images",
    "sample_steps": "denoising steps for the sample images",
    "sample_guidance_scale": "classifier-free guidance scale for the sample images (1 = none)",
    "guidance_scale": "the guidance scale saved with the model: what generate, chat, edit and serve use when a "
                      "request names none (null = 1.6, the samplers' default)",
    "image_guidance_scale": "the same for edits' guidance toward the source image (null = 1.5)",
    "progress": "show a progress bar",
    "probe_every": "conditioning probes (prompt gain, stack dependence) every this many steps (0 = off)",
    "probe_images": "images the conditioning probes use",
}
