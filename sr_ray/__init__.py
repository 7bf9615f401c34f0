"""sr_ray: SafetyReminder (arXiv 2506.15734) guarded VLM decoding, training and serving on Ray."""

__version__ = "0.1.0"
