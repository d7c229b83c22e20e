"""A miniature of LLaVA-3D's package (ZCMax/LLaVA-3D @ 91d979dc), written here from its interface, for
`adatoken eval --model llava3d`: the names and signatures its evaluation scripts call, nothing else.
The model is tests_legacy/llava3d_models.py's LlavaLlama3D; a scene folder holds scene.pt (views, depths,
poses, intrinsics) where LLaVA-3D's holds posed RGB-D frames."""
