"""Report tools: read records, never capture. numpy (and rich/matplotlib for output) only.

* :mod:`.tables`: row summaries of page tables and index vectors (live prefixes only);
* :mod:`.explain`: the explain rules (``Facts -> Finding``), most certain first;
* :mod:`.diff`: what differs between two dumps;
* :mod:`.plot`: heatmaps of page tables and allocator outputs;
* :mod:`.render`: the text views behind ``kvtrap dump ls|show|explain|diff``.
"""
