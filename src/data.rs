//! Episodic PASCAL-5i / COCO-20i data: lists, class index, episode sampling, transforms, loader.
