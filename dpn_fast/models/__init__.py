"""DPN68/92/98/107/131 constructors."""
from dpn_fast.checkpoint import load_checkpoint
from dpn_fast.models.config import CONFIGS
from dpn_fast.models.dpn import DPN

MODEL_NAMES = tuple(CONFIGS)


def create_model(name, fused=False, pretrained=None, class_num=1000):
    """Builds DPN `name`; `pretrained` is a .pdparams path (PaddleClas's or ours), loaded strictly."""
    model = DPN(name, class_num=class_num, fused=fused)
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model


def DPN68(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN68", fused, pretrained, class_num)


def DPN92(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN92", fused, pretrained, class_num)


def DPN98(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN98", fused, pretrained, class_num)


def DPN107(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN107", fused, pretrained, class_num)


def DPN131(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN131", fused, pretrained, class_num)
