"""A small subset of Detectron2's public API, with Detectron2's names, signatures and behaviour.

Used by :mod:`samantics_d2.d2` when Detectron2 cannot be imported. It is glue over the libraries
Detectron2 itself is built on (fvcore, iopath, omegaconf, pycocotools, lvis, torch.distributed),
written from Detectron2's documented behaviour. It covers only what this project calls: a name is
added here only when project code needs it. Import it through ``samantics_d2.d2``, not directly.
"""
