// The status page served at /: one HTML document whose script polls /api/status every second.
#ifndef MESHLM_SERVE_PAGE_H
#define MESHLM_SERVE_PAGE_H

const char *serve_page_html(void);

#endif
