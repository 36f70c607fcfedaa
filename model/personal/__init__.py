"""Personal avatars: a short video of one person -> that person's own avatar model.

Preparation: face landmarks through the clip (`landmarks`), head pose and a
person-specific neutral face (`geometry`), motion parameters in the units the model takes
(`motion`), a stable crop at the model's framing (`align`), a clean portrait (`portrait`),
the clip's speech (`video`), all written to one file by `prepare`. Fitting: the bundled
model's training stages on that file (`fit`, fed by `fit_data`), written as an avatar
model file (`avatar_file`) whose mouth follows speech through the motion fields
(`speech_mouth`). `knotstream avatar create` (`cli`) runs both; `knotstream eval
--personal` (`evaluate`, `evaluate_fit`, `speech_eval`, `drive`) scores the baselines (the
repeated portrait, the piecewise-affine `warp`) and fitted avatars on real clips; `check`
measures the motion measurement on world renders of known motion. The landmark model is
mediapipe's face mesh: an optional extra, imported only when a clip is tracked.
"""
