# llava/constants.py: the values LLaVA-3D's evaluation uses (:7-25).
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
DEFAULT_VIDEO_TOKEN = "<video>"
LOC_TOKEN_INDEX = -300  # a click prompt: each <boxes> becomes one token, the prompt encoder's feature of its click
DEFAULT_BOX_TOKEN = "<boxes>"
