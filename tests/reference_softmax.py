"""Independent single-process dense reference of the margin softmax (plain torch autograd)."""
import math

import torch
import torch.nn.functional as F


def dense_margin_softmax(X, W_active, target_pos, *, m1, m2, m3, s, grad="exact", tau=0.0):
    """X (Bg, D), W_active (A, D) float64; target_pos (Bg,) column of each row's target.
    Returns loss, dX, dW_active via autograd."""
    X = X.detach().clone().requires_grad_(True)
    W = W_active.detach().clone().requires_grad_(True)
    xn = X / X.norm(dim=1, keepdim=True)
    wn = W / W.norm(dim=1, keepdim=True)
    cos = (xn @ wn.t()).clamp(-1.0, 1.0)
    rows = torch.arange(X.shape[0])
    onehot = torch.zeros_like(cos, dtype=torch.bool)
    onehot[rows, target_pos] = True
    if tau > 0:
        dirty = (cos > tau) & ~onehot
        cos = cos * (~dirty).to(cos.dtype)
    ct = cos[rows, target_pos]
    theta = torch.acos(ct)
    margin_value = torch.cos(m1 * theta + m2) - m3
    if grad == "exact":
        within = (m1 * theta + m2) <= math.pi
        psi = torch.where(within, margin_value, ct - m3 - m2 * math.sin(m2))
    else:  # the margin as a constant shift in backward
        psi = ct + (margin_value - ct).detach()
    logits = torch.where(onehot, psi[:, None].expand_as(cos), cos) * s
    loss = F.cross_entropy(logits, target_pos)
    loss.backward()
    return loss.detach(), X.grad, W.grad
