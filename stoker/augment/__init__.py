"""Decode and augment image batches on CPU (Pillow) or GPU (DALI, Kornia) from one `TransformSpec`.

Start with `stoker.build_transform(spec, backend="auto")`; see docs/augment.md. Nothing heavy is
imported here: each backend module imports its library when it is built.
"""
