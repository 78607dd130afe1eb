"""Architecture configs: SD1.5 and the AnimateDiff v3 motion adapter at full size, and the tiny variants the
"tiny" spec builds (same block layout, small widths). Plain data, no torch import."""

from __future__ import annotations

from typing import Any

LATENT_SCALE = 0.18215
ORIGINAL_MOTION_GROUPS = 32  # GroupNorm groups of every motion module in the original AnimateDiff code
TINY_SEED = 0

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "down_block_types": list(SD_DOWN), "up_block_types": list(SD_UP),
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": LATENT_SCALE,
}
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 49407,
}
V3_ADAPTER_CONFIG: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280, 1280], "motion_layers_per_block": 2,
    "motion_transformer_layers_per_block": 1, "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1, "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32, "motion_max_seq_length": 32, "use_motion_mid_block": False,
    "conv_in_channels": None,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG, "sample_size": 8, "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 2,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG, "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "sample_size": 64,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    **SD15_TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "projection_dim": 32,
}
TINY_ADAPTER_CONFIG: dict[str, Any] = {
    **V3_ADAPTER_CONFIG, "block_out_channels": [32, 32, 64, 64], "motion_norm_num_groups": 8,
}
# spec -> (unet, motion adapter, vae, text encoder) configs of the specs built with random weights
RANDOM_SPECS = {
    "tiny": (TINY_UNET_CONFIG, TINY_ADAPTER_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG),
    "sd15-random": (SD15_UNET_CONFIG, V3_ADAPTER_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG),
}
