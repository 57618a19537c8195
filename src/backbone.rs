//! Dilated ResNet / VGG backbones exposing layer0..layer4, each convolution full-rank or SVD form.
