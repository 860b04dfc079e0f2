"""Heal: win back the quality a pair costs by refitting the paired blocks' output projections.

    stage.heal(source, plan, settings) -> HealResult (tensors under the export's names, header, report)
    The heal file `export --heal` reads: lpconvert/healfile.py (shared with export)

lsq.py is the training-free least-squares fit, distill.py the optional KL fine-tune after it;
streams.py keeps the residual stream of the windows at the layer being healed. torch loads with this
package: the CLI imports it inside the command.
"""

from .stage import HealResult, heal

__all__ = ["HealResult", "heal"]
