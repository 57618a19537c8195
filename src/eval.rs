//! The evaluation protocol: fixed-seed episodes, original-resolution comparison, result tables.
