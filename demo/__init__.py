"""The CPU demo (`make demo`): FaceVid-Synth, a tiny VAE and a 32 px text-to-video UNet on 2 cores.

Everything here serves the demo only and plugs into the framework from outside (`plugin: {module: demo}` in
configs/demo*.yaml; see demo/aids.py). The framework (data/, models/, facevid/, evaluation/) never imports it.
"""

from demo.aids import STAGES, DemoUNet3D, validate

__all__ = ["STAGES", "DemoUNet3D", "validate"]
