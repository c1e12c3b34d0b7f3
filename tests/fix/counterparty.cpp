// A QuickFIX (C++, 1.15.1) counterparty for the FIX session tests: an initiator or an
// acceptor (the settings' ConnectionType), with one session, scripted.
//
//   counterparty SETTINGS SCRIPT
//
// It starts, waits for its session to log on, then runs SCRIPT, one line at a time:
//   35=8|37=O1|...        an application message (tag=value, | between fields; header tags
//                         35, 43, 97, 122 go to the header), sent with Session::sendToTarget
//   #skip N               the next N outbound seqs are skipped (a gap the resend fills)
//   #logout / #logon      log the session out (messages sent meanwhile are stored, not sent)
//                         / in again
//   #possdup N            send the last N stored messages again as they are, PossDupFlag=Y
//   #raw TEXT             write TEXT on the connection (| is SOH, \xHH a byte) as it is
//   #rawfix TEXT          write TEXT (| is SOH) with 8, 9, 10 computed around it
//   #sleep MS             wait
//   #wait_logon           wait until logged on again
// then prints DONE and keeps the session (heartbeats, resends) until its standard input
// closes or it gets SIGTERM, and stops (Logout). Events go to standard output, one a line:
// LOGON, LOGOUT, IN <msg>, OUT <msg> (admin and application), DONE.
// Session's private sendRaw lock and responder are reached for #possdup and #raw: its own
// includes come first, so that the define below touches class Session only.
#include <quickfix/SessionState.h>
#include <quickfix/TimeRange.h>
#include <quickfix/SessionID.h>
#include <quickfix/Responder.h>
#include <quickfix/Fields.h>
#include <quickfix/DataDictionaryProvider.h>
#include <quickfix/Application.h>
#include <quickfix/Mutex.h>
#include <quickfix/Log.h>
#include <utility>
#include <map>
#include <queue>
#define private public
#include <quickfix/Session.h>
#undef private
#include <quickfix/Application.h>
#include <quickfix/FileLog.h>
#include <quickfix/FileStore.h>
#include <quickfix/SessionSettings.h>
#include <quickfix/SocketAcceptor.h>
#include <quickfix/SocketInitiator.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>

static std::atomic<bool> g_logged_on(false);
static std::atomic<bool> g_stop(false);
static std::mutex g_out;

static std::string bars(const std::string& s) {
    std::string r = s;
    for (auto& c : r) if (c == '\x01') c = '|';
    return r;
}

static void say(const std::string& line) {
    std::lock_guard<std::mutex> l(g_out);
    std::cout << line << std::endl;
}

class App : public FIX::Application {
public:
    void onCreate(const FIX::SessionID&) override {}
    void onLogon(const FIX::SessionID&) override { g_logged_on = true; say("LOGON"); }
    void onLogout(const FIX::SessionID&) override { g_logged_on = false; say("LOGOUT"); }
    void toAdmin(FIX::Message& m, const FIX::SessionID&) override {
        say("OUT " + bars(m.toString()));
    }
    void toApp(FIX::Message& m, const FIX::SessionID&) throw(FIX::DoNotSend) override {
        say("OUT " + bars(m.toString()));
    }
    void fromAdmin(const FIX::Message& m, const FIX::SessionID&)
        throw(FIX::FieldNotFound, FIX::IncorrectDataFormat, FIX::IncorrectTagValue,
              FIX::RejectLogon) override {
        say("IN " + bars(m.toString()));
    }
    void fromApp(const FIX::Message& m, const FIX::SessionID&)
        throw(FIX::FieldNotFound, FIX::IncorrectDataFormat, FIX::IncorrectTagValue,
              FIX::UnsupportedMessageType) override {
        say("IN " + bars(m.toString()));
    }
};

static bool wait_logon(int ms) {
    for (int i = 0; i < ms / 10 && !g_logged_on; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return g_logged_on;
}

static std::string unescape(const std::string& s) {
    std::string r;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '|') r += '\x01';
        else if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] == 'x') {
            r += (char)std::stoi(s.substr(i + 2, 2), nullptr, 16);
            i += 3;
        } else r += s[i];
    }
    return r;
}

static bool is_header(int tag) { return tag == 35 || tag == 43 || tag == 97 || tag == 122; }

static void raw_send(FIX::Session* s, const std::string& bytes) {
    FIX::Locker l(s->m_mutex);
    if (s->m_pResponder) s->m_pResponder->send(bytes);
}

static void run_line(FIX::Session* s, const FIX::SessionID& sid, const std::string& line) {
    if (line.empty()) return;
    if (line[0] != '#') {
        FIX::Message m;
        std::stringstream ss(line);
        std::string f;
        while (std::getline(ss, f, '|')) {
            auto eq = f.find('=');
            if (eq == std::string::npos) continue;
            int tag = std::stoi(f.substr(0, eq));
            std::string v = f.substr(eq + 1);
            if (is_header(tag)) m.getHeader().setField(tag, v);
            else m.setField(tag, v);
        }
        FIX::Session::sendToTarget(m, sid);
        return;
    }
    std::stringstream ss(line);
    std::string cmd, rest;
    ss >> cmd;
    std::getline(ss, rest);
    if (!rest.empty() && rest[0] == ' ') rest = rest.substr(1);
    if (cmd == "#skip") {
        s->setNextSenderMsgSeqNum(s->getExpectedSenderNum() + std::stoi(rest));
    } else if (cmd == "#logout") {
        s->logout("scripted");
        for (int i = 0; i < 500 && g_logged_on; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } else if (cmd == "#logon") {
        s->logon();
        wait_logon(10000);
    } else if (cmd == "#wait_logon") {
        wait_logon(10000);
    } else if (cmd == "#sleep") {
        std::this_thread::sleep_for(std::chrono::milliseconds(std::stoi(rest)));
    } else if (cmd == "#possdup") {
        int n = std::stoi(rest);
        int end = s->getExpectedSenderNum() - 1;
        std::vector<std::string> msgs;
        s->getStore()->get(end - n + 1, end, msgs);
        for (auto& str : msgs) {
            FIX::Message m(str, false);
            FIX::SendingTime st;
            m.getHeader().getField(st);
            m.getHeader().setField(FIX::PossDupFlag(true));
            m.getHeader().setField(FIX::OrigSendingTime(st.getValue()));
            m.getHeader().setField(FIX::SendingTime(FIX::UtcTimeStamp()));
            std::string out = m.toString();
            say("OUT " + bars(out));
            raw_send(s, out);
        }
    } else if (cmd == "#raw") {
        raw_send(s, unescape(rest));
    } else if (cmd == "#rawfix") {
        std::string body = unescape(rest);
        std::string bs = s->getSessionID().getBeginString().getValue();
        std::string head = "8=" + bs + "\x01" + "9=" + std::to_string(body.size()) + "\x01";
        std::string msg = head + body;
        unsigned sum = 0;
        for (unsigned char c : msg) sum += c;
        char cs[16];
        snprintf(cs, sizeof cs, "10=%03u\x01", sum % 256);
        raw_send(s, msg + cs);
    } else {
        say("UNKNOWN " + line);
    }
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: counterparty SETTINGS SCRIPT" << std::endl;
        return 2;
    }
    signal(SIGTERM, [](int) { g_stop = true; });
    signal(SIGPIPE, SIG_IGN);
    try {
        FIX::SessionSettings settings(argv[1]);
        App app;
        FIX::FileStoreFactory store(settings);
        FIX::FileLogFactory logs(settings);
        const FIX::SessionID sid = *settings.getSessions().begin();
        bool initiator = settings.get(sid).getString("ConnectionType") == "initiator";
        FIX::Initiator* ini = nullptr;
        FIX::Acceptor* acc = nullptr;
        if (initiator) { ini = new FIX::SocketInitiator(app, store, settings, logs); ini->start(); }
        else { acc = new FIX::SocketAcceptor(app, store, settings, logs); acc->start(); }
        say("STARTED");
        FIX::Session* s = FIX::Session::lookupSession(sid);
        if (!wait_logon(20000)) say("NO LOGON");
        std::ifstream script(argv[2]);
        std::string line;
        while (!g_stop && std::getline(script, line)) run_line(s, sid, line);
        say("DONE");
        // keep the session until standard input closes or SIGTERM
        std::thread eof([] { char c; while (read(0, &c, 1) > 0) {} g_stop = true; });
        eof.detach();
        while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(20));
        if (ini) { ini->stop(); delete ini; }
        if (acc) { acc->stop(); delete acc; }
        say("STOPPED");
    } catch (std::exception& e) {
        std::cerr << "counterparty: " << e.what() << std::endl;
        return 1;
    }
    return 0;
}
