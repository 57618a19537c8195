//! Segmentation of a user's own images from a few annotated supports.
