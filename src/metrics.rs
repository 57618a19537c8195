//! IoU accumulation: per-class foreground IoU (mIoU) and FB-IoU, label 255 ignored.
