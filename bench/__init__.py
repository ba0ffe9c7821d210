"""``make bench``: cachebus measured side by side with the floors under it.

Every figure in a report comes from one run, on one machine, at one time,
because the machine is shared and noisy.
"""
