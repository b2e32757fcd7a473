"""LMFusionModel: a frozen pretrained LM plus a parallel image copy of every decoder layer.

Text tokens run through the base model's own modules, image patch tokens through the image
copies, and one self-attention spans the whole interleaved sequence (causal, bidirectional
inside each image). For text-only input the computation is the base model's, op for op, so
its logits are bit-identical.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..base_models import load_text_model, weights_hash
from ..config import LMFusionConfig
from ..diffusion import DiffusionObjective, per_image_mse
from ..sampling import SamplingMixin
from ..utils import atomic_directory
from .image_blocks import ImageDownBlock, ImageUpBlock, TimestepEncoder
from .masks import image_segment_ids, transfusion_mask
from .routing import ImageLayer, Routing, feed_forward, project_qkv, reinitialize
from .sequence import MultimodalBatch

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


class LMFusionModel(SamplingMixin, nn.Module):
    def __init__(
        self, text_model: PreTrainedModel, config: LMFusionConfig, base_hash: str | None = None, tokenizer=None
    ):
        super().__init__()
        self.config = config
        self.text_model = text_model
        text_config = text_model.config
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
                ImageLayer(layer, separate, random_init, std) for layer in text_model.model.layers
            )
        self.image_norm = None
        if config.mode in ("lmfusion", "scratch"):
            self.image_norm = copy.deepcopy(text_model.model.norm).requires_grad_(True)

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
        self.objective = DiffusionObjective(config.objective, config.num_train_timesteps, config.beta_schedule,
                                            config.timestep_sampling or None, config.timestep_shift)
        self.tokenizer = None if tokenizer is None else self._prepare_tokenizer(tokenizer)

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

    # ------------------------------------------------------------------ construction and checkpoints
    @classmethod
    def from_text_model(cls, text_model_or_path, config: LMFusionConfig | None = None, tokenizer=None) -> "LMFusionModel":
        """Wrap a causal LM (a loaded model, a local folder, a hub id or "smollm2-135m")."""
        config = config or LMFusionConfig()
        if isinstance(text_model_or_path, str):
            text_model, loaded_tokenizer = load_text_model(text_model_or_path)
            config.base_model = text_model_or_path
            tokenizer = tokenizer or loaded_tokenizer
        else:
            text_model = text_model_or_path
        return cls(text_model, config, tokenizer=tokenizer)

    def save_pretrained(self, directory) -> None:
        """Write the config and the non-base weights; the folder appears complete or not at all."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.adapter_state_dict().items()}
        if not self.config.text_frozen:  # tied embeddings share storage: store the tie once
            state = {k: v.clone() for k, v in state.items()}
        with atomic_directory(directory) as tmp:
            self.config.save(tmp / CONFIG_FILE)
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mode": self.config.mode})

    @classmethod
    def from_pretrained(cls, directory, base_model: str | None = None, dtype: torch.dtype = torch.float32) -> "LMFusionModel":
        """Rebuild a saved model. `base_model` overrides where the base LM is loaded from."""
        from pathlib import Path

        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not an LMFusion checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        config = LMFusionConfig.load(directory / CONFIG_FILE)
        text_model, tokenizer = load_text_model(base_model or config.base_model, dtype=dtype)
        found = None
        if config.text_frozen:
            found = weights_hash(text_model)
            if found != config.base_model_hash:
                raise ValueError(
                    f"base model {base_model or config.base_model} has weights hash {found[:12]}..., but the "
                    f"checkpoint {directory} was trained on {str(config.base_model_hash)[:12]}...: wrong base model"
                )
        model = cls(text_model, config, base_hash=found, tokenizer=tokenizer)
        state = load_file(str(directory / WEIGHTS_FILE))
        if config.text_frozen:
            expected = set(model.adapter_state_dict())
            if set(state) != expected:
                missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(f"checkpoint weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
            model.load_state_dict(state, strict=False)
        else:
            model.load_state_dict(state, strict=True)
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

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        special = input_ids >= self.text_vocab_size
        embeds = self.text_model.get_input_embeddings()(input_ids.masked_fill(special, 0))
        if bool(special.any()):
            extra = self.special_embed((input_ids - self.text_vocab_size).clamp(0, 1))
            embeds = torch.where(special.unsqueeze(-1), extra.to(embeds.dtype), embeds)
        return embeds

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Base vocabulary logits (the base LM head) followed by the BOI and EOI logits."""
        return torch.cat([self.text_model.get_output_embeddings()(hidden), self.special_head(hidden)], dim=-1)

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
    ) -> LMFusionOutput:
        """Run an interleaved batch.

        input_ids: [B, L]; at image positions the id is ignored.
        image_mask: [B, L] bool, True at image patch positions (tokens_per_image per image).
        image_latents: [N, C, H, W] (noisy) latents of the images in reading order; timesteps: [N].
        attention_mask: [B, past + L], 1 = real token; positions follow it (left padding works).
        logits_mask: [B, L] bool; when given, logits only for those positions, as [M, V + 2].
        """
        text_rows, image_rows, routing, cache, skips, temb = self._backbone(
            input_ids, image_mask, image_latents, timesteps, attention_mask, position_ids, cache, use_cache
        )
        logits = None
        if logits_mask is not None:
            wanted = logits_mask.reshape(-1)
            rows = torch.zeros(wanted.numel(), dtype=torch.long, device=wanted.device)
            rows[routing.text_index] = torch.arange(routing.text_index.numel(), device=wanted.device)
            if routing.has_images and bool((wanted & image_mask.reshape(-1)).any()):
                raise ValueError("logits_mask selects image positions; logits exist only for text")
            logits = self.text_logits(text_rows.index_select(0, rows[wanted]))
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
        return LMFusionOutput(logits=logits, noise_pred=noise_pred, cache=cache)

    def _backbone(self, input_ids, image_mask, image_latents, timesteps, attention_mask, position_ids, cache, use_cache):
        batch, length = input_ids.shape
        device = input_ids.device
        routing = Routing.from_mask(image_mask, batch, length, device)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.text_config)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {past + length}")

        text_embeds = self.embed_text(input_ids).reshape(batch * length, -1)
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
            tokens, skips = self.image_in(image_latents, temb)
            x_image = tokens.reshape(-1, tokens.shape[-1]).to(x_text.dtype)

        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past, past + length, device=device).unsqueeze(0)
        if routing.has_images:
            segments = image_segment_ids(image_mask, self.config.tokens_per_image)
            mask = transfusion_mask(segments, attention_mask, past)
        else:  # exactly the mask the base model builds, so text-only runs are bit-identical
            mask = create_causal_mask(
                config=self.text_config,
                inputs_embeds=text_embeds.view(batch, length, -1),
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        rotary = self.text_model.model.rotary_emb(text_embeds.view(batch, length, -1), position_ids=position_ids)

        for index in range(len(self.text_model.model.layers)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x_text, x_image = checkpoint(
                    self._layer, index, x_text, x_image, routing, rotary, mask, cache, use_reentrant=False
                )
            else:
                x_text, x_image = self._layer(index, x_text, x_image, routing, rotary, mask, cache)

        x_text = self.text_model.model.norm(x_text)
        if x_image is not None:
            final_norm = self.image_norm if self.image_norm is not None else self.text_model.model.norm
            x_image = final_norm(x_image)
        return x_text, x_image, routing, cache, skips, temb

    def _layer(self, index, x_text, x_image, routing: Routing, rotary, mask, cache):
        text = self.text_model.model.layers[index]
        attn = text.self_attn
        image = self.image_layers[index] if self.image_layers is not None else None
        # Which modules the image rows use: their own copy where one exists, else the shared text one.
        image_attn = image if image is not None and image.separate_attention else attn
        image_attn_norm = image.input_layernorm if image_attn is image else text.input_layernorm
        image_ffn = image if image is not None else text

        q, k, v = project_qkv(text.input_layernorm, attn, x_text)
        if x_image is not None:
            qi, ki, vi = project_qkv(image_attn_norm, image_attn, x_image)
            q, k, v = routing.merge(q, qi), routing.merge(k, ki), routing.merge(v, vi)

        shape = (routing.batch, routing.length, -1, attn.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary_pos_emb(q, k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, index)
        out, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        out_text, out_image = routing.split(out.reshape(routing.batch * routing.length, -1))

        x_text = x_text + attn.o_proj(out_text)
        x_text = feed_forward(x_text, text.post_attention_layernorm, text.mlp)
        if x_image is not None:
            x_image = x_image + image_attn.o_proj(out_image)
            x_image = feed_forward(x_image, image_ffn.post_attention_layernorm, image_ffn.mlp)
        return x_text, x_image

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
        if n_images:
            latents = batch.latents
            timesteps = self.objective.sample_timesteps(n_images, batch.max_timesteps.cpu(), generator).to(latents.device)
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
            noisy = self.objective.add_noise(latents, noise, timesteps)
            target = self.objective.target(latents, noise, timesteps)
        out = forward(batch.input_ids, batch.image_mask, noisy, timesteps, batch.attention_mask, logits_mask=wants)
        zero = out.logits.sum() * 0.0 if out.logits is not None else torch.zeros((), device=self.device)
        text = (
            nn.functional.cross_entropy(out.logits.float(), labels.to(out.logits.device), reduction="sum")
            if labels.numel()
            else zero
        )
        image = per_image_mse(out.noise_pred, target).sum() if n_images else zero
        return LossSums(text, image, int(labels.numel()), n_images)

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
        self.gradient_checkpointing = enabled
