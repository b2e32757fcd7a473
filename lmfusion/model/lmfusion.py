"""LMFusionModel: a frozen pretrained LM plus a parallel image copy of every decoder layer.

Text tokens run through the base model's own modules, image patch tokens through the image
copies, and one self-attention spans the whole interleaved sequence (causal, bidirectional
inside each image). For text-only input the computation is the base model's, op for op, so
its logits are bit-identical.

The base may also be a LLaVA-family VLM (LLaVAFusion): the images it reads go through its own
vision tower and projector into its placeholder tokens (model/vlm.py), which are frozen text rows
here, so its understanding is unchanged; the images LMFusion generates use the image modules.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask

from ..base_models import check_supported, load_processor, load_text_model, weights_hash
from ..config import LMFusionConfig
from ..diffusion import DiffusionObjective, per_image_mse
from ..integrity import CheckpointError, read_safetensors, verify_manifest, write_manifest
from ..utils import atomic_directory
from .draw_margin import boi_margin_hinge
from .fusion_layer import FusionDecoderLayer, unwrap_checkpointing, wrap_checkpointing
from .image_blocks import ImageDownBlock, ImageUpBlock, TimestepEncoder, residual_input, residual_output
from .masks import block_mask, image_segment_ids, transfusion_mask
from .routing import ImageLayer, Routing, frozen_context_mask, reinitialize
from .sequence import MultimodalBatch
from .vlm import is_vlm, merge_understanding_images

CONFIG_FILE = "lmfusion_config.json"
WEIGHTS_FILE = "lmfusion_weights.safetensors"


@dataclass
class LossSums:
    text: torch.Tensor  # summed token cross-entropy (with graph)
    image: torch.Tensor  # summed per-image noise MSE (with graph)
    text_tokens: int
    images: int


@dataclass
class LossOutput:
    loss: torch.Tensor  # text_loss + diffusion_loss_weight * image_loss
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    text_tokens: int
    images: int


@dataclass
class LMFusionOutput:
    logits: torch.Tensor | None  # [B, L, V + 2] (zeros at image positions) or [M, V + 2] when selected
    noise_pred: torch.Tensor | None  # [N_images, C, H, W]: the objective's prediction (velocity for flow, noise for eps)
    cache: Cache | None = None


class LMFusionModel(nn.Module):
    def __init__(
        self, text_model: PreTrainedModel, config: LMFusionConfig, base_hash: str | None = None, tokenizer=None,
        processor=None,
    ):
        """`text_model`: the frozen base, a causal LM or a supported VLM (then named so for its
        checkpoint keys, `text_model.*`, which adapters never store). `processor`: a VLM's own."""
        super().__init__()
        check_supported(text_model.config)
        config = copy.deepcopy(config)  # the model's own copy: the caller's object is never written to
        if is_vlm(text_model) and not config.text_frozen:
            raise ValueError(f"mode {config.mode!r} trains the base model, but a VLM base stays frozen: "
                             "use mode 'lmfusion' or 'ffn_only'")
        self.config = config
        self.text_model = text_model
        self.processor = processor
        # The decoder (embeddings, layers, rotary, final norm) of an LM or of a VLM's language model.
        decoder = text_model.get_decoder()
        text_config = text_model.config.get_text_config()
        self.text_config = text_config
        hidden = text_config.hidden_size
        std = getattr(text_config, "initializer_range", 0.02)

        if config.mode == "scratch":
            reinitialize(text_model, std)
            text_model.tie_weights()
        # The hash identifies the weights an adapter must be attached to (frozen modes only).
        if config.text_frozen and config.base_model_hash is None:
            config.base_model_hash = base_hash or weights_hash(text_model)
        text_model.requires_grad_(not config.text_frozen)

        if config.mode == "dense":
            self.image_layers = None
        else:
            separate = config.mode != "ffn_only"
            random_init = config.mode == "scratch" or config.image_init == "random"
            self.image_layers = nn.ModuleList(
                ImageLayer(layer, separate, random_init, std) for layer in decoder.layers
            )
        # The fused layers the forward pass runs: each holds the base model's own text layer and
        # its image copy. They are a second path to modules registered above, so their state-dict
        # keys are left out (see _drop_layer_keys): saved weights keep the names `text_model.*`
        # and `image_layers.N.*`, and checkpoints from before this module existed still load.
        self.layers = nn.ModuleList(
            FusionDecoderLayer(text, None if self.image_layers is None else self.image_layers[i], i)
            for i, text in enumerate(decoder.layers)
        )
        self.register_state_dict_post_hook(_drop_layer_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_layer_keys)
        self.image_norm = None
        if config.mode in ("lmfusion", "scratch"):
            self.image_norm = copy.deepcopy(decoder.norm).requires_grad_(True)

        self.time_embed = TimestepEncoder(config.unet_channels, config.time_embed_dim)
        self.image_in = ImageDownBlock(config, hidden)
        self.image_out = ImageUpBlock(config, hidden)

        # BOI and EOI get their own trainable embedding rows and output logits, appended after the
        # base vocabulary so that no text id, embedding or logit of the base model changes.
        self.text_vocab_size = text_model.get_input_embeddings().weight.shape[0]
        self.special_embed = nn.Embedding(2, hidden)
        self.special_head = nn.Linear(hidden, 2, bias=False)
        with torch.no_grad():  # start as an "average token" rather than an outlier
            self.special_embed.weight.copy_(text_model.get_input_embeddings().weight.mean(0).expand(2, -1))
            self.special_head.weight.copy_(text_model.get_output_embeddings().weight.mean(0).expand(2, -1))
        self.gradient_checkpointing = False
        # Run text rows that nothing trainable precedes without an autograd graph (Routing.frozen_context).
        # Gradients are the same either way. Off by default: it removes ~10% of a quickstart step's
        # FLOPs but the split matmuls made the step 5-8% slower on 2 CPU cores
        # (benchmarks/results/quickstart_profile.md); TrainConfig.skip_frozen_context turns it on.
        self.skip_frozen_context = False
        self.objective = DiffusionObjective(config.objective, config.num_train_timesteps, config.beta_schedule,
                                            config.timestep_sampling or None, config.timestep_shift)
        self.tokenizer = None if tokenizer is None else self._prepare_tokenizer(tokenizer)

    def _apply(self, fn, recurse=True):
        """`.to(bf16)` and friends, except that the rotary frequencies keep their dtype: HF loads
        them in fp32 whatever the weights' dtype, and rounding them to bf16 would move every
        position's rotation, so bf16 text logits would no longer equal the base model's."""
        rotary = self.decoder.rotary_emb
        kept = dict(rotary.named_buffers(recurse=False))
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(rotary, name)
            if after is not None and after.dtype != before.dtype:
                setattr(rotary, name, before.to(after.device))
        return result

    def _prepare_tokenizer(self, tokenizer):
        """Register BOI/EOI with the tokenizer at ids V and V+1, after every base-vocabulary id."""
        filler = [f"<|lmfusion_unused_{i}|>" for i in range(len(tokenizer), self.text_vocab_size)]
        if len(tokenizer) > self.text_vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {self.text_vocab_size} embeddings")
        if filler:  # Qwen-style padded vocabularies: keep BOI/EOI right after the embedding rows
            tokenizer.add_tokens(filler, special_tokens=True)
        tokenizer.add_special_tokens({"additional_special_tokens": [self.config.boi_token, self.config.eoi_token]})
        ids = tokenizer.convert_tokens_to_ids([self.config.boi_token, self.config.eoi_token])
        if ids != [self.boi_token_id, self.eoi_token_id]:
            raise ValueError(f"BOI/EOI landed on ids {ids}, expected {[self.boi_token_id, self.eoi_token_id]}")
        return tokenizer

    @property
    def decoder(self) -> nn.Module:
        """The base's decoder stack: `model` of a causal LM, `model.language_model` of a VLM."""
        return self.text_model.get_decoder()

    @property
    def is_vlm(self) -> bool:
        return is_vlm(self.text_model)

    # ------------------------------------------------------------------ construction and checkpoints
    @classmethod
    def from_text_model(cls, text_model_or_path, config: LMFusionConfig | None = None, tokenizer=None) -> "LMFusionModel":
        """Wrap a causal LM or a LLaVA-family VLM (a loaded model, a local folder, a hub id or
        "smollm2-135m"). A VLM given by path brings its processor (questions about images)."""
        config = config or LMFusionConfig()
        processor = None
        if isinstance(text_model_or_path, str):
            text_model, loaded_tokenizer = load_text_model(text_model_or_path)
            config = dataclasses.replace(config, base_model=text_model_or_path)
            processor = load_processor(text_model_or_path) if is_vlm(text_model) else None
            # One tokenizer object: the processor's, so BOI/EOI registered below are the ones it knows.
            tokenizer = tokenizer or (processor.tokenizer if processor is not None else loaded_tokenizer)
        else:
            text_model = text_model_or_path
        return cls(text_model, config, tokenizer=tokenizer, processor=processor)

    def save_pretrained(self, directory, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the config and the non-base weights; the folder appears complete or not at all.

        `state` replaces adapter_state_dict() (a sharded trainer passes the gathered full tensors).
        """
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in (state or self.adapter_state_dict()).items()}
        if not self.config.text_frozen:  # tied embeddings share storage: store the tie once
            state = {k: v.clone() for k, v in state.items()}
        with atomic_directory(directory) as tmp:
            self.config.save(tmp / CONFIG_FILE)
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mode": self.config.mode})
            write_manifest(tmp, editable=(CONFIG_FILE,))  # last: sizes and checksums of the weights

    @classmethod
    def from_pretrained(cls, directory, base_model: str | None = None, dtype: torch.dtype = torch.float32) -> "LMFusionModel":
        """Rebuild a saved model. `base_model` overrides where the base LM is loaded from.

        A damaged or foreign file raises CheckpointError (a ValueError) naming that file; the
        folder's manifest, where it has one, is verified before anything is loaded. The base is
        loaded in float32, the precision its hash was taken in at training, and the whole model is
        cast to `dtype` after the check (so a bfloat16 load briefly holds the base in float32).
        """
        from pathlib import Path

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not an LMFusion checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        verify_manifest(directory)
        config = LMFusionConfig.load(directory / CONFIG_FILE)
        text_model, tokenizer = load_text_model(base_model or config.base_model, dtype=torch.float32)
        processor = load_processor(base_model or config.base_model) if is_vlm(text_model) else None
        tokenizer = processor.tokenizer if processor is not None else tokenizer
        found = None
        if config.text_frozen:
            found = weights_hash(text_model)
            if found != config.base_model_hash:
                raise ValueError(
                    f"base model {base_model or config.base_model} has weights hash {found[:12]}..., but the "
                    f"checkpoint {directory} was trained on {str(config.base_model_hash)[:12]}...: wrong base model"
                )
        model = cls(text_model, config, base_hash=found, tokenizer=tokenizer, processor=processor)
        state = read_safetensors(directory / WEIGHTS_FILE)
        model.load_adapter_state(state, directory / WEIGHTS_FILE)
        return model.to(dtype)

    # ------------------------------------------------------------------ ids and embeddings
    @property
    def boi_token_id(self) -> int:
        return self.text_vocab_size

    @property
    def eoi_token_id(self) -> int:
        return self.text_vocab_size + 1

    @property
    def device(self) -> torch.device:
        return self.special_head.weight.device

    def embed_text(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                   image_sizes: torch.Tensor | None = None, **vision_kwargs) -> torch.Tensor:
        """Base embeddings, BOI/EOI rows, and (VLM base, `pixel_values` given) the VLM's own image
        features at its image placeholder tokens, as its forward computes them."""
        special = input_ids >= self.text_vocab_size
        embeds = self.text_model.get_input_embeddings()(input_ids.masked_fill(special, 0))
        if bool(special.any()):
            extra = self.special_embed((input_ids - self.text_vocab_size).clamp(0, 1))
            embeds = torch.where(special.unsqueeze(-1), extra.to(embeds.dtype), embeds)
        if pixel_values is not None:
            if not self.is_vlm:
                raise ValueError("pixel_values are a VLM's image inputs, but this model's base is a text LM: "
                                 "give images as image_latents")
            embeds = merge_understanding_images(self.text_model, input_ids, embeds, pixel_values, image_sizes,
                                                **vision_kwargs)
        return embeds

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Base vocabulary logits (the base LM head) followed by the BOI and EOI logits."""
        return torch.cat([self.text_model.get_output_embeddings()(hidden), self.special_head(hidden)], dim=-1)

    def _selected_logits(self, text_rows: torch.Tensor, selected: torch.Tensor, n_context: int) -> torch.Tensor:
        """text_logits of the text rows `selected`; rows below n_context are frozen context, whose base
        logits are constants (no graph): only their BOI/EOI logits, through the trainable special
        head, are differentiated. Same values as text_logits on all rows."""
        if n_context == 0:
            return self.text_logits(text_rows.index_select(0, selected))
        is_context = selected < n_context
        hidden = text_rows.index_select(0, selected)
        constant = hidden.detach()[is_context]
        with torch.no_grad():
            base = self.text_model.get_output_embeddings()(constant)
        context_logits = torch.cat([base, self.special_head(constant)], dim=-1)
        live_logits = self.text_logits(hidden[~is_context])
        logits = live_logits.new_empty(selected.numel(), live_logits.shape[-1])
        logits = logits.index_put((torch.nonzero(is_context).squeeze(1),), context_logits.to(logits.dtype))
        return logits.index_put((torch.nonzero(~is_context).squeeze(1),), live_logits)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        image_latents: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        logits_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_conditions: torch.Tensor | None = None,
    ) -> LMFusionOutput:
        """Run an interleaved batch.

        input_ids: [B, L]; at image positions the id is ignored.
        image_mask: [B, L] bool, True at image patch positions (tokens_per_image per image).
        image_latents: [N, C, H, W] (noisy) latents of the images in reading order; timesteps: [N].
        attention_mask: [B, past + L], 1 = real token; positions follow it (left padding works).
        logits_mask: [B, L] bool; when given, logits only for those positions, as [M, V + 2].
        document_ids: [B, L] example id per position of packed rows (-1 = padding; pass their
        position_ids too, restarting per example); each example then attends only within itself.
        pixel_values / image_sizes / batch_num_images (VLM base only): the images the VLM reads, as
        its processor makes them, for the `<image>` placeholders in input_ids (its own computation).
        image_conditions: [N, C, H, W] (image_condition "previous" / "residual" only) the clean latent
        each image is conditioned on, zeros for none; None = none for every image.
        """
        vision = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        if batch_num_images is not None:
            vision["batch_num_images"] = batch_num_images
        text_rows, image_rows, routing, cache, skips, temb = self._backbone(
            input_ids, image_mask, image_latents, timesteps, attention_mask, position_ids, cache, use_cache,
            document_ids, vision, image_conditions,
        )
        logits = None
        if logits_mask is not None:
            wanted = logits_mask.reshape(-1)
            rows = torch.zeros(wanted.numel(), dtype=torch.long, device=wanted.device)
            rows[routing.text_index] = torch.arange(routing.text_index.numel(), device=wanted.device)
            if routing.has_images and bool((wanted & image_mask.reshape(-1)).any()):
                raise ValueError("logits_mask selects image positions; logits exist only for text")
            logits = self._selected_logits(text_rows, rows[wanted], routing.n_context)
        elif text_rows.shape[0]:
            text_logits = self.text_logits(text_rows)
            if routing.has_images:
                full = text_logits.new_zeros(routing.batch * routing.length, text_logits.shape[-1])
                text_logits = full.index_copy(0, routing.text_index, text_logits)
            logits = text_logits.view(routing.batch, routing.length, -1)
        noise_pred = None
        if image_rows is not None and image_rows.shape[0]:
            n = image_latents.shape[0]
            noise_pred = self.image_out(image_rows.view(n, self.config.tokens_per_image, -1), skips, temb)
            if self.config.image_condition == "residual" and image_conditions is not None:
                noise_pred = residual_output(noise_pred, image_conditions)
        return LMFusionOutput(logits=logits, noise_pred=noise_pred, cache=cache)

    def _backbone(self, input_ids, image_mask, image_latents, timesteps, attention_mask, position_ids, cache, use_cache,
                  document_ids=None, vision=None, image_conditions=None):
        batch, length = input_ids.shape
        device = input_ids.device
        if document_ids is not None and (cache is not None or use_cache):
            raise ValueError("packed rows (document_ids) are a training layout; they cannot use a KV cache")
        context = None
        if self.skip_frozen_context and cache is None and torch.is_grad_enabled() and self.config.text_frozen:
            context = frozen_context_mask(input_ids, image_mask, attention_mask, self.text_vocab_size, document_ids)
        routing = Routing.from_mask(image_mask, batch, length, device, context)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.text_config)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {past + length}")

        text_embeds = self.embed_text(input_ids, **(vision or {})).reshape(batch * length, -1)
        x_text = text_embeds.index_select(0, routing.text_index) if routing.has_images else text_embeds
        x_image = skips = temb = None
        if routing.has_images:
            if image_latents is None or timesteps is None:
                raise ValueError("image_mask marks image positions but image_latents/timesteps are missing")
            expected = image_latents.shape[0] * self.config.tokens_per_image
            if routing.image_index.numel() != expected:
                raise ValueError(
                    f"image_mask has {routing.image_index.numel()} image positions but {image_latents.shape[0]} "
                    f"images need {expected} ({self.config.tokens_per_image} each)"
                )
            temb = self.time_embed(timesteps, image_latents.dtype)
            if self.config.image_condition == "residual" and image_conditions is not None:
                image_latents = residual_input(image_latents, image_conditions,
                                               self.objective.sigmas(timesteps, image_latents))
            tokens, skips = self.image_in(image_latents, temb, image_conditions)
            x_image = tokens.reshape(-1, tokens.shape[-1]).to(x_text.dtype)

        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past, past + length, device=device).unsqueeze(0)
        flex = self.config.attention == "flex" and cache is None
        if routing.has_images or document_ids is not None or flex:
            segments = (image_segment_ids(image_mask, self.config.tokens_per_image) if routing.has_images
                        else torch.full_like(input_ids, -1))
            if flex:  # one BlockMask for the whole stack: every layer reads the same one
                mask = block_mask(segments, attention_mask, document_ids)
            else:
                mask = transfusion_mask(segments, attention_mask, past, document_ids)
        else:  # exactly the mask the base model builds, so text-only runs are bit-identical
            mask = create_causal_mask(
                config=self.text_config,
                inputs_embeds=text_embeds.view(batch, length, -1),
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        decoder = self.decoder
        rotary = decoder.rotary_emb(text_embeds.view(batch, length, -1), position_ids=position_ids)

        for layer in self.layers:
            x_text, x_image = layer(x_text, x_image, routing, rotary, mask, cache)

        x_text = routing.frozen_context(decoder.norm, x_text)
        if x_image is not None:
            final_norm = self.image_norm if self.image_norm is not None else decoder.norm
            x_image = final_norm(x_image)
        return x_text, x_image, routing, cache, skips, temb

    # ------------------------------------------------------------------ training objective
    def loss_sums(self, batch: MultimodalBatch, generator: torch.Generator | None = None, forward=None) -> LossSums:
        """Summed token cross-entropy and summed per-image noise MSE, with their counts.

        Sums let a caller normalise over several micro-batches or ranks (the training loop);
        `forward` may be a wrapped copy of this model (DDP). Timesteps, then noise, are drawn
        from `generator`, so the same seed gives the same noise whoever calls.
        """
        forward = forward or self
        wants, labels = batch.text_targets()
        noisy = timesteps = target = None
        n_images = 0 if batch.latents is None else batch.latents.shape[0]
        scored = batch.loss_images.to(batch.latents.device) if n_images else None
        n_scored = int(scored.sum()) if n_images else 0
        if n_images:
            # Only loss-bearing images draw a t (the same draws as before clean images existed when
            # there are none); clean context images (editing sources) stay at t = 0, un-noised.
            latents = batch.latents
            drawn = self.objective.sample_timesteps(n_scored, batch.max_timesteps[batch.loss_images].cpu(), generator)
            timesteps = torch.zeros(n_images, dtype=drawn.dtype).masked_scatter(batch.loss_images.cpu(), drawn)
            timesteps = timesteps.to(latents.device)
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
            noisy = torch.where(scored.view(-1, 1, 1, 1), self.objective.add_noise(latents, noise, timesteps), latents)
            target = self.objective.target(latents, noise, timesteps)
        conditions = batch.condition_latents() if self.config.reads_previous_image else None
        out = forward(batch.input_ids, batch.image_mask, noisy, timesteps, batch.attention_mask,
                      position_ids=batch.position_ids, logits_mask=wants, document_ids=batch.document_ids,
                      image_conditions=conditions)
        zero = out.logits.sum() * 0.0 if out.logits is not None else torch.zeros((), device=self.device)
        text = zero
        if labels.numel():
            logits, labels = out.logits.float(), labels.to(out.logits.device)
            text = nn.functional.cross_entropy(logits, labels, reduction="sum")
            if self.config.boi_margin > 0:
                text = text + boi_margin_hinge(logits, labels, self.boi_token_id, self.config.boi_margin)
        image = per_image_mse(out.noise_pred[scored], target[scored]).sum() if n_scored else zero
        if n_images and not n_scored:  # clean images only: keep their modules in the graph at zero
            image = image + out.noise_pred.sum() * 0.0
        return LossSums(text, image, int(labels.numel()), n_scored)

    def loss(self, batch: MultimodalBatch, generator: torch.Generator | None = None) -> LossOutput:
        """Next-token cross-entropy on text + lambda x per-image noise MSE (Transfusion Eq. 4)."""
        sums = self.loss_sums(batch, generator)
        text_loss = sums.text / max(sums.text_tokens, 1)
        image_loss = sums.image / max(sums.images, 1)
        total = text_loss + self.config.diffusion_loss_weight * image_loss
        return LossOutput(total, text_loss.detach(), image_loss.detach(), sums.text_tokens, sums.images)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def load_adapter_state(self, state: dict[str, torch.Tensor], source="the given state") -> None:
        """Load what adapter_state_dict() saved; a mismatch (foreign or other-config file) raises
        CheckpointError naming `source`."""
        expected = self.adapter_state_dict()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise CheckpointError(f"{source}: weights do not match this model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise CheckpointError(f"{source}: weights have other shapes than this model's, e.g. {wrong[0]} "
                                  f"{tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}")
        self.load_state_dict(state, strict=not self.config.text_frozen)

    # Modules with no counterpart in the base LM: they start from scratch (and may need a higher
    # learning rate than the copied layers, which start from pretrained weights).
    FRESH_MODULES = ("time_embed", "image_in", "image_out", "special_embed", "special_head")

    def is_fresh(self, name: str) -> bool:
        """Whether the parameter `name` belongs to a freshly initialised module."""
        return name.split(".", 1)[0] in self.FRESH_MODULES

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not the frozen base model (all weights in dense/scratch modes)."""
        state = self.state_dict()
        if not self.config.text_frozen:
            return state
        return {k: v for k, v in state.items() if not k.startswith("text_model.")}

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each fused layer's activations in backward (torch's checkpoint_wrapper per layer)."""
        self.gradient_checkpointing = enabled
        for index, layer in enumerate(self.layers):
            self.layers[index] = wrap_checkpointing(layer) if enabled else unwrap_checkpointing(layer)

    def fusion_layers(self) -> list[FusionDecoderLayer]:
        """The FusionDecoderLayer modules, without any wrapper around them."""
        return [unwrap_checkpointing(layer) for layer in self.layers]


def _drop_layer_keys(module, state_dict, prefix, local_metadata) -> None:
    """`layers.*` names the same tensors as `text_model.*` and `image_layers.*`: keep one name each."""
    for key in [k for k in state_dict if k.startswith(prefix + "layers.")]:
        del state_dict[key]


def _ignore_missing_layer_keys(module, incompatible_keys) -> None:
    """Loading fills the fused layers through their canonical names; `layers.*` is never expected."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not _LAYER_KEY.search(k)]


_LAYER_KEY = re.compile(r"(^|\.)layers\.\d+\.(_orig_mod\.)?(_checkpoint_wrapped_module\.)?(text|image)\.")
