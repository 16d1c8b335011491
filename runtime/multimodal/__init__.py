"""Image / video decoding, preprocessing, placeholders and M-RoPE positions."""
