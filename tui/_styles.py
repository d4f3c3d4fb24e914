"""The dashboard's stylesheet (Textual CSS), shared by every screen."""

APP_CSS = """
Screen { background: $background; }
.dialog {
    width: 72; height: auto; max-height: 90%;
    padding: 1 2; background: $panel; border: thick $primary;
}
ModalScreen { align: center middle; background: $background 60%; }
.dialog-title { text-style: bold; width: 1fr; margin-bottom: 1; }
.dialog-detail { margin-bottom: 1; color: $text-muted; }
.dialog-error { color: $error; height: auto; }
.dialog-buttons { height: auto; align-horizontal: right; margin-top: 1; }
.dialog-buttons Button { margin-left: 1; }
.status-line { height: 1; padding: 0 1; background: $panel; color: $text-muted; }
.status-line.error { color: $error; }
.section-title { text-style: bold; color: $accent; margin-top: 1; }
.pane-title { text-style: bold; padding: 0 1; background: $boost; }
.muted { color: $text-muted; }
DataTable { height: 1fr; }
#query { border: tall $surface; height: 3; }
#query:focus { border: tall $primary; }
#query.-invalid { border: tall $error; }
.help { width: 100; height: 90%; }
RunDetailScreen TabbedContent { height: 1fr; }
RunDetailScreen ContentSwitcher { height: 1fr; }
RunDetailScreen TabPane { height: 1fr; padding: 0; }
#run-title { height: 1; background: $boost; }
#log-view { height: 1fr; }
#child-table { height: auto; max-height: 20; }
.complete-token { width: 90; height: 24; }
#token-editor { height: 1fr; }
.replay { width: 90; }
#test-body { height: 1fr; }
#test-payload { width: 2fr; padding: 0 1; }
#test-options { width: 1fr; padding: 0 1; }
#payload-editor { height: 1fr; }
#version-select { width: 60; }
.filters { width: 100; }
#filter-columns { height: auto; }
#filter-status { width: 30; height: 17; }
#replay-editor { height: 12; }
"""
