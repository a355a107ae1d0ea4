"""Measurements inside a run: loss smoothness, BN's train/eval gap, dead units.

Four measurements, each opt-in from ``analysis.*`` (see README, "Analysis"):

1. **Loss-landscape probe** (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch
   Normalization Help Optimization?", Sec. 3.1 and Appendix A.2.2, Fig. 4). Every
   ``analysis.probe_every`` steps, from the current parameters theta and the current gradient
   g (``.grad`` after backward, before clipping), evaluate loss and gradient at
   theta - eta * s * g for each multiplier s (eta = the current learning rate), on the same
   batch, without changing anything the training step uses. Logged: ``probe/loss_range``
   (max - min loss along the direction, s = 0 included), ``probe/loss_min`` /
   ``probe/loss_max`` (the band of Fig. 4a), ``probe/grad_pred`` (largest ||g_s - g||,
   "gradient predictiveness", Fig. 4b; ``probe/grad_pred_min`` the band's lower edge) and
   ``probe/beta`` (largest ||g_s - g|| / ||theta_s - theta||, the "effective beta-smoothness"
   of Fig. 4c). :func:`landscape_probe` is the maths on any (loss_fn, params).
   ``analysis.probe_mode: fixed`` measures the landscape without the step: ``probes_per_run``
   times over the run, on one held-out batch (the first ``probe_images`` test images), along
   the normalized gradient of that batch's loss, at the absolute distances ``probe_distances``;
   beta is the least-squares slope of ||g_t - g|| against t (:func:`fixed_probe`), the same
   measurement at every batch size and LR.
2. **Train/eval gap** for batch-statistics schemes: test accuracy in eval mode (running
   statistics), in train mode at the run's batch size (each test batch's own statistics), and
   after recomputing the running statistics with the model frozen (:func:`precise_bn`,
   "precise BN"; at the end of the run with ``analysis.precise_bn``, or afterwards with
   ``normbench analyze --recalibrate``).
3. **Dead units**: per activation layer, the fraction of channels whose output sits at the
   activation's floor (0 for ReLU, tau for TLU) for every sample of a fixed probe batch.
4. **Activation statistics**: per-channel mean and std of every norm layer's input (the
   "internal covariate shift" view, Santurkar et al. Sec. 2), as TensorBoard histograms.

Nothing here changes the training trajectory: every extra forward runs on a deep copy of the
model (so parameters, ``.grad``, running statistics, ``num_batches_tracked`` and any other
buffer or attribute of the trained model are untouched) and the RNG states are restored
around it. Probe values and histograms stay on the device until the epoch ends (one host
read per epoch); they travel in the checkpoint so an interrupted run resumes with them.
"""
