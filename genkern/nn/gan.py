"""GANLoss: a module over genkern.discriminator_loss / genkern.generator_loss."""

from __future__ import annotations

from torch import nn

from genkern.ops.gan_loss import check_settings, discriminator_loss, generator_loss


class GANLoss(nn.Module):
    """Holds a GAN loss kind and its settings; `.discriminator(real, fake)`, `.generator(fake)`.

    Calling the module is `.discriminator`. `real_label` < 1 applies one-sided label
    smoothing (nonsaturating and minimax kinds only).
    """

    def __init__(
        self, kind: str = "nonsaturating", *, reduction: str = "mean", real_label: float = 1.0, impl: str = "auto"
    ):
        super().__init__()
        real_label = check_settings(kind, reduction, real_label)
        self.kind, self.reduction, self.real_label, self.impl = kind, reduction, real_label, impl

    def discriminator(self, real_logits, fake_logits):
        return discriminator_loss(
            real_logits, fake_logits, self.kind, reduction=self.reduction, real_label=self.real_label, impl=self.impl
        )

    def generator(self, fake_logits, real_logits=None):
        return generator_loss(fake_logits, self.kind, real_logits=real_logits, reduction=self.reduction, impl=self.impl)

    forward = discriminator

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}, real_label={self.real_label}, impl={self.impl!r}"
