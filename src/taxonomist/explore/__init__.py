"""Exploring images beyond the trained classifier: group unlabelled images
(``taxonomist cluster``, :mod:`.cluster`) and choose what to label next (``taxonomist suggest``,
:mod:`.suggest`). Both read images as ``taxonomist predict`` does and embed them with
:mod:`.pool`."""
