//! Paper tables: aggregation of eval results beside the published numbers.
