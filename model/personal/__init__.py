"""Personal avatars: a short video of one person -> the data a personal model is fitted on.

Preparation (this package): face landmarks through the clip (`landmarks`), head pose and a
person-specific neutral face (`geometry`), motion parameters in the units the model takes
(`motion`), a stable crop at the model's framing (`align`), a clean portrait (`portrait`),
the clip's speech (`video`), all written to one file by `prepare`. `knotstream avatar
create` (`cli`) runs it; `knotstream eval --personal` (`evaluate`) scores baselines
(the repeated portrait, the piecewise-affine `warp`) on real clips; `check` measures the
motion measurement on world renders of known motion. The landmark model is mediapipe's
face mesh: an optional extra, imported only when a clip is tracked.
"""
