"""Data for SimMIM pretraining and the later fine-tune, by role:

- `sources`: lists of (train, val) samples ``(image, label)``; ``image`` is a file path (folder and list
  sources) or a uint8 array (digits):
  - ``folder``: every image under ``root`` (recursive). Labels are the sorted first-level subfolders when every
    image sits in one, else 0. ``root/train`` + ``root/val`` are used as the splits when both exist; otherwise a
    fixed 2 % of the files (at least one) is held out for validation.
  - ``list``: a text file with one image path per line and an optional integer label after a space or tab;
    relative paths are relative to the list file; blank lines and ``#`` comments are skipped. Split as above.
  - ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, labels 0..9, offline), upscaled once
    to ``img_size``, with a fixed stratified 20 % validation split (`digits_split`).
  - ``shards``: WebDataset tar shards, streamed (`shards`).
- `decode`: files and bytes to uint8 RGB, JPEGs at the scale the transform needs, EXIF orientation applied.
- `transforms` (and `augment`: RandAugment, random erasing): crops, flips, normalization.
- `datasets`: decoding + transform + mask per sample, the resumable (index, epoch) sampler.
- `datamodule`: the LightningDataModules; `workers`: DataLoaders whose workers outlive a job's stop signals.

Folder and list files are not decoded at setup (``verify=True`` does, and drops the unreadable ones): a file
that fails to decode when read is replaced by another sample of the split and counted (`SkipCounter`). Their
paths and labels live in numpy arrays (`FileList`), so DataLoader workers share them instead of copying.

Masks and pretraining augmentations depend only on (seed, epoch, index): `EpochSampler` hands the epoch to the
dataset with every index, so neither the worker count nor a resumed run changes them; a run resumed mid-epoch
continues the same order after the batches it had done (`SimMIMDataModule.state_dict`).

Import from the modules: the package imports none of them, so `workers` and `shards` come without OpenCV,
albumentations and scikit-learn (the GPU tools run without them).
"""
