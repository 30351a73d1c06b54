"""Tiny TransDiff training steps with every random draw fixed: the shared yardstick of the execution tests
(`--compile`), which compare a compiled model against a plain one."""
import torch

from models.transdiff import transdiff_tiny

TINY = dict(img_size=16, vae_stride=2, vae_embed_dim=4, class_num=5, buffer_size=4, diffusion_batch_mul=2)
LABELS = torch.tensor([2, 0, 4, 2])


def tiny_model(mrar=False, grad_checkpointing=False, attn_dropout=0.0, proj_dropout=0.0):
    """The same weights at every call; 1-step, or MRAR (patch size 2)."""
    torch.manual_seed(0)
    model = transdiff_tiny(**TINY, patch_size=2 if mrar else 1, mrar=mrar, grad_checkpointing=grad_checkpointing,
                           attn_dropout=attn_dropout, proj_dropout=proj_dropout)
    torch.nn.init.normal_(model.diffdecoder.net.final_layer.linear.weight, std=0.02)  # zero-init blocks gradients
    return model


def training_images(model, seed=1):
    """Latents [B, C, h, w] for LABELS (MRAR: one per stage)."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(LABELS), model.vae_embed_dim, model.latent_size, model.latent_size)
    if model.mrar:
        return [torch.randn(shape, generator=g) for _ in range(model.num_stages)]
    return torch.randn(shape, generator=g)


def loss_and_grads(model):
    """One training forward and backward with fixed draws: the loss and every parameter's gradient."""
    torch.manual_seed(7)  # the dropout masks
    loss = model.train()(training_images(model), LABELS, generator=torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
