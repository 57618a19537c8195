//! The PFENet few-shot segmentation head over the backbone.
