"""Analyses behind one seam (`base.Analysis`): each is a class named by conf/analysis/<name>.yaml."""
