"""Token conventions shared by every task, model and loss in latentdiv.

Ids 0..2 are reserved; content tokens start at ``FIRST_CONTENT``.

* ``PAD`` (0) fills positions that carry no token. Every loss masks them.
* ``BOS`` (1) is the first decoder input after the prompt; the model predicts
  ``y_1`` from it.
* ``EOS`` (2) ends an output. It is a real, predicted token (its position is
  valid and scored); every position *after* it is PAD and masked.

A prompt ``x`` is a fixed-length row of tokens (PAD allowed, it is masked out of
attention). An output ``y`` is a row of ``T`` tokens.
"""

PAD = 0
BOS = 1
EOS = 2
FIRST_CONTENT = 3
NUM_RESERVED = FIRST_CONTENT
