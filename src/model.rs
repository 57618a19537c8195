//! The PFENet few-shot segmentation head over the backbone.

mod head;

pub use head::{
    is_head_parameter, prior_mask, weighted_gap, HeadOutput, PfeHead, QueryFeatures,
    SupportFeatures, HEAD_MODULES,
};
