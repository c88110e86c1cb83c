"""ifi-seg: segment hip MRI and quantify ischiofemoral impingement per hip."""
__version__ = "0.1.0"
