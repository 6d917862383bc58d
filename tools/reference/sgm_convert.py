"""Converts the tiny diffusers SDXL state dicts to the original single-file (SGM) layout, and back.

The mapping is written from the layout facts (see tests/fixtures/README.md); `sgm_to_diffusers`
inverts it so the script can check the round trip exactly.
"""

import torch

RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefix_map(cfg):
    """diffusers module prefix -> (SGM module prefix, rename table for the module's own children)."""
    L = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    m = {
        "time_embedding.linear_1": ("time_embed.0", None),
        "time_embedding.linear_2": ("time_embed.2", None),
        "add_embedding.linear_1": ("label_emb.0.0", None),
        "add_embedding.linear_2": ("label_emb.0.2", None),
        "conv_in": ("input_blocks.0.0", None),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
    }
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(L):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{1 + (L + 1) * i + j}.0", RESNET_UNET)
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{1 + (L + 1) * i + j}.1", None)
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{1 + (L + 1) * i + L}.0.op", None)
    m["mid_block.resnets.0"] = ("middle_block.0", RESNET_UNET)
    m["mid_block.attentions.0"] = ("middle_block.1", None)
    m["mid_block.resnets.1"] = ("middle_block.2", RESNET_UNET)
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(L + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{(L + 1) * i + j}.0", RESNET_UNET)
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{(L + 1) * i + j}.1", None)
        if i < n - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{(L + 1) * i + L}.{2 if attn else 1}.conv", None)
    return m


def vae_prefix_map(cfg):
    n = len(cfg["block_out_channels"])
    L = cfg["layers_per_block"]
    resnet = {"conv_shortcut": "nin_shortcut"}
    m = {"quant_conv": ("quant_conv", None), "post_quant_conv": ("post_quant_conv", None)}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", resnet)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", resnet)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTN)
    for i in range(n):
        for j in range(L):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", resnet)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
        # The decoder's up blocks are numbered from the lowest resolution in diffusers, from the highest in SGM.
        for j in range(L + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", resnet)
        if i < n - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", None)
    return m


def _apply_prefix_map(sd, pmap, out_prefix):
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        hit = None
        for cut in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:cut]) in pmap:
                hit = cut
                break
        if hit is None:
            raise KeyError(f"no SGM mapping for {key}")
        new_prefix, children = pmap[".".join(parts[:hit])]
        rest = ".".join(parts[hit:])
        if children:
            for old, new in children.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
        out[f"{out_prefix}{new_prefix}.{rest}"] = t
    return out


def unet_to_sgm(sd, cfg):
    return _apply_prefix_map(sd, unet_prefix_map(cfg), "model.diffusion_model.")


def vae_to_sgm(sd, cfg):
    out = _apply_prefix_map(sd, vae_prefix_map(cfg), "first_stage_model.")
    for k, t in out.items():
        # The SGM VAE's mid attention uses 1x1 convolutions.
        if ".mid.attn_1." in k and k.endswith(".weight") and t.dim() == 2:
            out[k] = t[:, :, None, None].contiguous()
    return out


def te1_to_sgm(sd):
    return {"conditioner.embedders.0.transformer." + k: t for k, t in sd.items()}


def te2_to_sgm(sd, num_layers):
    p = "conditioner.embedders.1.model."
    out = {
        p + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        p + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        # open_clip applies `x @ text_projection`, so it stores the transpose of the Linear weight.
        p + "text_projection": sd["text_projection.weight"].t().contiguous(),
    }
    for i in range(num_layers):
        d = f"text_model.encoder.layers.{i}."
        s = f"{p}transformer.resblocks.{i}."
        out[s + "attn.in_proj_weight"] = torch.cat([sd[d + f"self_attn.{x}_proj.weight"] for x in "qkv"], 0)
        out[s + "attn.in_proj_bias"] = torch.cat([sd[d + f"self_attn.{x}_proj.bias"] for x in "qkv"], 0)
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[s + a + ".weight"] = sd[d + b + ".weight"]
            out[s + a + ".bias"] = sd[d + b + ".bias"]
    return out


def _invert_prefix_map(sd, pmap, in_prefix):
    inv = {}
    for dk, (sk, children) in pmap.items():
        inv[sk] = (dk, {v: k for k, v in children.items()} if children else None)
    body = {k[len(in_prefix):]: t for k, t in sd.items() if k.startswith(in_prefix)}
    return _apply_prefix_map(body, inv, "")


def sgm_to_diffusers(sd, unet_cfg, vae_cfg, te2_layers):
    """Inverse of the functions above (used only to check the round trip)."""
    unet = _invert_prefix_map(sd, unet_prefix_map(unet_cfg), "model.diffusion_model.")
    vae = _invert_prefix_map(sd, vae_prefix_map(vae_cfg), "first_stage_model.")
    vae = {k: (t[:, :, 0, 0] if t.dim() == 4 and ".mid_block.attentions." in k else t) for k, t in vae.items()}
    p1 = "conditioner.embedders.0.transformer."
    te1 = {k[len(p1):]: t for k, t in sd.items() if k.startswith(p1)}
    p = "conditioner.embedders.1.model."
    te2 = {
        "text_model.embeddings.token_embedding.weight": sd[p + "token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd[p + "positional_embedding"],
        "text_model.final_layer_norm.weight": sd[p + "ln_final.weight"],
        "text_model.final_layer_norm.bias": sd[p + "ln_final.bias"],
        "text_projection.weight": sd[p + "text_projection"].t().contiguous(),
    }
    for i in range(te2_layers):
        d = f"text_model.encoder.layers.{i}."
        s = f"{p}transformer.resblocks.{i}."
        w, b = sd[s + "attn.in_proj_weight"], sd[s + "attn.in_proj_bias"]
        h = w.shape[0] // 3
        for n, x in enumerate("qkv"):
            te2[d + f"self_attn.{x}_proj.weight"] = w[n * h:(n + 1) * h]
            te2[d + f"self_attn.{x}_proj.bias"] = b[n * h:(n + 1) * h]
        for a, bb in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                      ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            te2[d + bb + ".weight"] = sd[s + a + ".weight"]
            te2[d + bb + ".bias"] = sd[s + a + ".bias"]
    return unet, vae, te1, te2
